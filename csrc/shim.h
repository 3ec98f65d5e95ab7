/* SPDX-License-Identifier: Apache-2.0 */
/* ondemand-d's C shim: the hot path of a READ (aligned pwrite + completion ioctl).
 * build_shim.py hands the part between the cdef markers to cffi, with each
 * #define's value replaced by "..." so the compiler supplies it. */
#ifndef ONDEMAND_SHIM_H
#define ONDEMAND_SHIM_H
#include <stddef.h>
#include <stdint.h>
#include <linux/ioctl.h>

/* cdef-begin */
#define ONDEMAND_SHIM_ABI 1
/* include/uapi/linux/cachefiles.h: _IOW(0x98, 1, int) */
#define ONDEMAND_IOC_READ_COMPLETE _IOW(0x98, 1, int)
#define ONDEMAND_BLOCK 4096

/* ioctl(fd, CACHEFILES_IOC_READ_COMPLETE, msg_id): msg_id by value. 0 or -errno. */
int od_read_complete(int fd, uint32_t msg_id);

/* Write len bytes of buf at off (a multiple of 4096) into fd in whole 4 KiB
 * blocks from a 4 KiB-aligned buffer, zero-padding the last block; then, if
 * complete is non-zero, complete msg_id. 0 or -errno; on error nothing is
 * completed, so the caller can still complete without data. */
int od_fill(int fd, const void *buf, size_t len, uint64_t off, uint32_t msg_id, int complete);
/* cdef-end */
#endif
