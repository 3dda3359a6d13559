/*
 * Stand-in for libuv's uv.h, for compiling pyworker/adoption.pyx only.
 *
 * That module cimports uvloop's Cython declarations (the .pxd files its wheel
 * ships), and Cython then emits uvloop's object layouts, which name a few libuv
 * types.  uvloop's wheel carries no libuv headers, and cydispatch must build
 * with `pip install .` alone, so the types are declared here: opaque where
 * uvloop's objects hold only pointers to them, and with libuv's sizes on
 * 64-bit Linux where an object embeds one (uv_shutdown_t in every stream,
 * the process options in UVProcess).  A wrong size cannot go unnoticed: at
 * import Cython compares each uvloop type's size with the one compiled here
 * and warns, and pyworker.worker.load_direct_adoption treats that warning as
 * a reason not to use the module.
 */
#ifndef CYDISPATCH_UV_STANDIN_H
#define CYDISPATCH_UV_STANDIN_H

typedef struct uv_loop_s uv_loop_t;
typedef struct uv_handle_s uv_handle_t;
typedef struct uv_req_s uv_req_t;

/* UV_REQ_FIELDS (data, type, 6 reserved pointers) + handle + cb */
typedef struct { void *opaque[10]; } uv_shutdown_t;
/* exit_cb, file, args, env, cwd, flags, stdio_count, stdio, uid, gid */
typedef struct { void *opaque[8]; } uv_process_options_t;
/* flags, then a union of a stream pointer and an fd */
typedef struct { void *opaque[2]; } uv_stdio_container_t;

typedef enum { UV_RUN_DEFAULT = 0, UV_RUN_ONCE, UV_RUN_NOWAIT } uv_run_mode;

#endif
