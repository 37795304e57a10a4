/*
 * libnftables, loaded at run time, for the kernel data path (src/data/kernel-forward.ts).
 *
 * With `client.dataPath: kernel` a passive data connection is not relayed at all: the proxy
 * adds a DNAT/SNAT mapping for the one transfer to a table of its own, and the client's
 * connection to the leased port is NATed by the kernel straight to the server's passive
 * port (the way OpenBSD ftp-proxy uses pf). A mapping is one `add element` command: spawning
 * nft(8) for each would cost milliseconds of CPU per transfer, so the library nft(8) itself
 * is built on runs them in process (about 0.1 ms each, measured, test/bench).
 *
 * The library is opened with dlopen() rather than linked: it is only needed when an operator
 * asks for the kernel path, building needs no -dev headers, and a machine without the
 * nftables package still loads this addon (the splice relay does not need it).
 *
 * JS interface:
 *   nftOpen() -> handle            throws FTPP_ERR_KERNEL_PATH with the reason
 *   nftRun(handle, commands) -> [rc, output, error]
 *     commands: nft(8) script text, run as one transaction; rc 0 on success.
 */
#define _GNU_SOURCE
#define NAPI_VERSION 8
#include <node_api.h>

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* From <nftables/libnftables.h> (stable ABI of libnftables.so.1). */
struct nft_ctx;
#define NFT_CTX_DEFAULT 0
typedef struct nft_ctx* (*nft_ctx_new_fn)(uint32_t flags);
typedef void (*nft_ctx_free_fn)(struct nft_ctx* ctx);
typedef int (*nft_ctx_buffer_fn)(struct nft_ctx* ctx);
typedef const char* (*nft_ctx_get_buffer_fn)(struct nft_ctx* ctx);
typedef int (*nft_run_cmd_from_buffer_fn)(struct nft_ctx* ctx, const char* buf);

static struct {
  void* lib;
  nft_ctx_new_fn ctx_new;
  nft_ctx_free_fn ctx_free;
  nft_ctx_buffer_fn buffer_output;
  nft_ctx_buffer_fn buffer_error;
  nft_ctx_get_buffer_fn get_output;
  nft_ctx_get_buffer_fn get_error;
  nft_run_cmd_from_buffer_fn run;
} nft;

static const char* load_library(char* why, size_t why_len) {
  if (nft.lib) return NULL;
  void* lib = dlopen("libnftables.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    snprintf(why, why_len, "libnftables.so.1 not found (install the nftables package): %s", dlerror());
    return why;
  }
  nft.ctx_new = (nft_ctx_new_fn)dlsym(lib, "nft_ctx_new");
  nft.ctx_free = (nft_ctx_free_fn)dlsym(lib, "nft_ctx_free");
  nft.buffer_output = (nft_ctx_buffer_fn)dlsym(lib, "nft_ctx_buffer_output");
  nft.buffer_error = (nft_ctx_buffer_fn)dlsym(lib, "nft_ctx_buffer_error");
  nft.get_output = (nft_ctx_get_buffer_fn)dlsym(lib, "nft_ctx_get_output_buffer");
  nft.get_error = (nft_ctx_get_buffer_fn)dlsym(lib, "nft_ctx_get_error_buffer");
  nft.run = (nft_run_cmd_from_buffer_fn)dlsym(lib, "nft_run_cmd_from_buffer");
  if (!nft.ctx_new || !nft.ctx_free || !nft.buffer_output || !nft.buffer_error || !nft.get_output || !nft.get_error || !nft.run) {
    snprintf(why, why_len, "libnftables.so.1 lacks an expected symbol");
    dlclose(lib);
    return why;
  }
  nft.lib = lib;
  return NULL;
}

static void finalize_ctx(napi_env env, void* data, void* hint) {
  (void)env;
  (void)hint;
  if (data) nft.ctx_free((struct nft_ctx*)data);
}

static napi_value nft_open(napi_env env, napi_callback_info info) {
  (void)info;
  char why[512];
  const char* failure = load_library(why, sizeof why);
  if (failure) {
    napi_throw_error(env, "FTPP_ERR_KERNEL_PATH", failure);
    return NULL;
  }
  struct nft_ctx* ctx = nft.ctx_new(NFT_CTX_DEFAULT);
  if (!ctx) {
    napi_throw_error(env, "FTPP_ERR_KERNEL_PATH", "nft_ctx_new failed");
    return NULL;
  }
  /* Output and errors go to buffers we hand back. (Not quite all: without CAP_NET_ADMIN the
   * library also prints "Operation not permitted (you must be root)" to stderr itself; the
   * proxy then stops with FTPP_ERR_KERNEL_PATH anyway, so one stray line is tolerated.) */
  if (nft.buffer_output(ctx) != 0 || nft.buffer_error(ctx) != 0) {
    nft.ctx_free(ctx);
    napi_throw_error(env, "FTPP_ERR_KERNEL_PATH", "cannot buffer libnftables output");
    return NULL;
  }
  napi_value handle;
  if (napi_create_external(env, ctx, finalize_ctx, NULL, &handle) != napi_ok) {
    nft.ctx_free(ctx);
    napi_throw_error(env, "FTPP_ERR_KERNEL_PATH", "napi_create_external failed");
    return NULL;
  }
  return handle;
}

static napi_value nft_run(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  void* data = NULL;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 || napi_get_value_external(env, argv[0], &data) != napi_ok || !data) {
    napi_throw_type_error(env, NULL, "nftRun(handle, commands)");
    return NULL;
  }
  size_t len = 0;
  if (napi_get_value_string_utf8(env, argv[1], NULL, 0, &len) != napi_ok) {
    napi_throw_type_error(env, NULL, "commands must be a string");
    return NULL;
  }
  char* commands = malloc(len + 1);
  if (!commands) {
    napi_throw_error(env, "FTPP_ERR_KERNEL_PATH", "out of memory");
    return NULL;
  }
  napi_get_value_string_utf8(env, argv[1], commands, len + 1, &len);
  struct nft_ctx* ctx = data;
  int rc = nft.run(ctx, commands);
  free(commands);
  const char* out = nft.get_output(ctx);
  const char* err = nft.get_error(ctx);
  napi_value result, rc_value, out_value, err_value;
  napi_create_array_with_length(env, 3, &result);
  napi_create_int32(env, rc, &rc_value);
  napi_create_string_utf8(env, out ? out : "", NAPI_AUTO_LENGTH, &out_value);
  napi_create_string_utf8(env, err ? err : "", NAPI_AUTO_LENGTH, &err_value);
  napi_set_element(env, result, 0, rc_value);
  napi_set_element(env, result, 1, out_value);
  napi_set_element(env, result, 2, err_value);
  return result;
}

void nftables_init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"nftOpen", NULL, nft_open, NULL, NULL, NULL, napi_default, NULL},
      {"nftRun", NULL, nft_run, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
