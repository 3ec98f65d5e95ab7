# SPDX-License-Identifier: Apache-2.0
import sys

from ondemand_d.cli import main

sys.exit(main())
