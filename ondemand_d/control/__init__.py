# SPDX-License-Identifier: Apache-2.0
"""The control socket: a running daemon's views (status, inflight, metrics, trace) and actions.

`server` serves HTTP on a root-only unix socket; `client` is what the CLI commands use.
Each view lives in its own module and adds its routes with `ControlServer.add_route`.
"""
