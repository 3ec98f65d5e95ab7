/* SPDX-License-Identifier: Apache-2.0 */
#define _GNU_SOURCE
#include "shim.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

/* A bounce buffer of this size serves unaligned sources and the padded tail. */
#define BOUNCE (1u << 20)

int od_read_complete(int fd, uint32_t msg_id)
{
	return ioctl(fd, ONDEMAND_IOC_READ_COMPLETE, (unsigned long)msg_id) < 0 ? -errno : 0;
}

static int pwrite_all(int fd, const char *p, size_t len, uint64_t off)
{
	while (len > 0) {
		ssize_t n = pwrite(fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -EIO;
		/* The backing file does direct I/O: a short write must end on a block. */
		if ((size_t)n % ONDEMAND_BLOCK && (size_t)n != len)
			return -EIO;
		p += n;
		off += (uint64_t)n;
		len -= (size_t)n;
	}
	return 0;
}

int od_fill(int fd, const void *buf, size_t len, uint64_t off, uint32_t msg_id, int complete)
{
	const char *src = buf;
	size_t direct = len;
	char *bounce = NULL;
	int rc;

	if (off % ONDEMAND_BLOCK)
		return -EINVAL;
	/* Aligned source: write all whole blocks straight from it. */
	if ((uintptr_t)src % ONDEMAND_BLOCK)
		direct = 0;
	else
		direct -= len % ONDEMAND_BLOCK;
	rc = pwrite_all(fd, src, direct, off);
	if (rc == 0 && direct < len) {
		if (posix_memalign((void **)&bounce, ONDEMAND_BLOCK, BOUNCE))
			return -ENOMEM;
		for (size_t done = direct; rc == 0 && done < len;) {
			size_t n = len - done < BOUNCE ? len - done : BOUNCE;
			size_t padded = (n + ONDEMAND_BLOCK - 1) & ~(size_t)(ONDEMAND_BLOCK - 1);
			memcpy(bounce, src + done, n);
			memset(bounce + n, 0, padded - n);
			rc = pwrite_all(fd, bounce, padded, off + done);
			done += n;
		}
		free(bounce);
	}
	if (rc == 0 && complete)
		rc = od_read_complete(fd, msg_id);
	return rc;
}
