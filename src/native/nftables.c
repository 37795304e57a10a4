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
 *   nftRunBatch(handle, scripts, callback(errors))
 *     On a libuv pool thread: every script in one transaction; when that fails, each script
 *     on its own. errors[i] is '' for a script that took effect, else libnftables' words.
 *     A call costs 0.3-0.5 ms of CPU whatever it carries (issue #14, measured), and the
 *     removals after a transfer are nobody's reply: they leave the event loop, and those
 *     queued while one batch runs go together in the next (src/data/nft-batches.ts).
 *
 * One libnftables context is not safe to use from two threads at once: a mutex per handle
 * serializes nftRun and batches, so a sync call waits for a batch in flight and then sees
 * the table as that batch left it (the order the calls were made in).
 */
#define _GNU_SOURCE
#define NAPI_VERSION 8
#include <node_api.h>

#include <dlfcn.h>
#include <pthread.h>
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

/* One context and the lock that serializes its use (see the header). */
typedef struct {
  struct nft_ctx* ctx;
  pthread_mutex_t lock;
} nft_handle;

static void finalize_handle(napi_env env, void* data, void* hint) {
  (void)env;
  (void)hint;
  nft_handle* h = data;
  if (!h) return;
  nft.ctx_free(h->ctx);
  pthread_mutex_destroy(&h->lock);
  free(h);
}

static nft_handle* handle_arg(napi_env env, napi_value value) {
  void* data = NULL;
  if (napi_get_value_external(env, value, &data) != napi_ok) return NULL;
  return data;
}

/* A JS string as a malloc'ed C string, or NULL (not a string, or out of memory). */
static char* string_arg(napi_env env, napi_value value) {
  size_t len = 0;
  if (napi_get_value_string_utf8(env, value, NULL, 0, &len) != napi_ok) return NULL;
  char* text = malloc(len + 1);
  if (!text) return NULL;
  napi_get_value_string_utf8(env, value, text, len + 1, &len);
  return text;
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
  nft_handle* h = calloc(1, sizeof *h);
  if (!h) {
    nft.ctx_free(ctx);
    napi_throw_error(env, "FTPP_ERR_KERNEL_PATH", "out of memory");
    return NULL;
  }
  h->ctx = ctx;
  pthread_mutex_init(&h->lock, NULL);
  napi_value handle;
  if (napi_create_external(env, h, finalize_handle, NULL, &handle) != napi_ok) {
    finalize_handle(env, h, NULL);
    napi_throw_error(env, "FTPP_ERR_KERNEL_PATH", "napi_create_external failed");
    return NULL;
  }
  return handle;
}

static napi_value nft_run(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  nft_handle* h = NULL;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 || !(h = handle_arg(env, argv[0]))) {
    napi_throw_type_error(env, NULL, "nftRun(handle, commands)");
    return NULL;
  }
  char* commands = string_arg(env, argv[1]);
  if (!commands) {
    napi_throw_type_error(env, NULL, "commands must be a string");
    return NULL;
  }
  napi_value result, rc_value, out_value, err_value;
  pthread_mutex_lock(&h->lock);
  int rc = nft.run(h->ctx, commands);
  const char* out = nft.get_output(h->ctx);
  const char* err = nft.get_error(h->ctx);
  napi_create_string_utf8(env, out ? out : "", NAPI_AUTO_LENGTH, &out_value);
  napi_create_string_utf8(env, err ? err : "", NAPI_AUTO_LENGTH, &err_value);
  pthread_mutex_unlock(&h->lock);
  free(commands);
  napi_create_array_with_length(env, 3, &result);
  napi_create_int32(env, rc, &rc_value);
  napi_set_element(env, result, 0, rc_value);
  napi_set_element(env, result, 1, out_value);
  napi_set_element(env, result, 2, err_value);
  return result;
}

typedef struct {
  napi_async_work work;
  napi_ref handle_ref; /* keeps the context alive while the batch runs */
  napi_ref callback_ref;
  nft_handle* h;
  uint32_t count;
  char** scripts;
  char** errors; /* per script: NULL took effect, else libnftables' words */
} batch_job;

static void free_batch(napi_env env, batch_job* job) {
  for (uint32_t i = 0; i < job->count; i++) {
    free(job->scripts[i]);
    if (job->errors) free(job->errors[i]);
  }
  free(job->scripts);
  free(job->errors);
  if (job->handle_ref) napi_delete_reference(env, job->handle_ref);
  if (job->callback_ref) napi_delete_reference(env, job->callback_ref);
  if (job->work) napi_delete_async_work(env, job->work);
  free(job);
}

/* Run one script; NULL when it took effect, else libnftables' words (malloc'ed). Both
 * buffers are read every time: reading one hands it back empty for the next run. */
static char* run_script(nft_handle* h, const char* script) {
  int rc = nft.run(h->ctx, script);
  (void)nft.get_output(h->ctx);
  const char* err = nft.get_error(h->ctx);
  if (rc == 0) return NULL;
  char* text = strdup(err && *err ? err : "libnftables failed");
  return text ? text : strdup("");
}

static void batch_execute(napi_env env, void* data) {
  (void)env;
  batch_job* job = data;
  size_t total = 1;
  for (uint32_t i = 0; i < job->count; i++) total += strlen(job->scripts[i]) + 1;
  char* joined = malloc(total);
  pthread_mutex_lock(&job->h->lock);
  int failed = 1;
  if (joined) {
    char* at = joined;
    for (uint32_t i = 0; i < job->count; i++) at = stpcpy(stpcpy(at, job->scripts[i]), "\n");
    *at = '\0';
    char* err = run_script(job->h, joined);
    failed = err != NULL;
    free(err);
    free(joined);
  }
  /* One transaction fails as a whole: then each script on its own, in order (a removal
   * whose DNAT element already expired must not keep the others in the table). */
  if (failed) {
    for (uint32_t i = 0; i < job->count; i++) {
      job->errors[i] = run_script(job->h, job->scripts[i]);
    }
  }
  pthread_mutex_unlock(&job->h->lock);
}

static void batch_complete(napi_env env, napi_status status, void* data) {
  batch_job* job = data;
  napi_value callback, errors, global, text;
  napi_create_array_with_length(env, job->count, &errors);
  for (uint32_t i = 0; i < job->count; i++) {
    const char* err = status != napi_ok ? "batch cancelled" : job->errors[i] ? job->errors[i] : "";
    napi_create_string_utf8(env, err, NAPI_AUTO_LENGTH, &text);
    napi_set_element(env, errors, i, text);
  }
  napi_get_global(env, &global);
  if (napi_get_reference_value(env, job->callback_ref, &callback) == napi_ok && callback) {
    napi_call_function(env, global, callback, 1, &errors, NULL);
  }
  free_batch(env, job);
}

static napi_value nft_run_batch(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  nft_handle* h = NULL;
  bool is_array = false;
  napi_valuetype callback_type = napi_undefined;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3 || !(h = handle_arg(env, argv[0])) ||
      napi_is_array(env, argv[1], &is_array) != napi_ok || !is_array || napi_typeof(env, argv[2], &callback_type) != napi_ok ||
      callback_type != napi_function) {
    napi_throw_type_error(env, NULL, "nftRunBatch(handle, scripts, callback)");
    return NULL;
  }
  batch_job* job = calloc(1, sizeof *job);
  if (!job) {
    napi_throw_error(env, "FTPP_ERR_KERNEL_PATH", "out of memory");
    return NULL;
  }
  job->h = h;
  napi_get_array_length(env, argv[1], &job->count);
  job->scripts = calloc(job->count ? job->count : 1, sizeof(char*));
  job->errors = calloc(job->count ? job->count : 1, sizeof(char*));
  if (!job->scripts || !job->errors) {
    job->count = 0;
    free_batch(env, job);
    napi_throw_error(env, "FTPP_ERR_KERNEL_PATH", "out of memory");
    return NULL;
  }
  for (uint32_t i = 0; i < job->count; i++) {
    napi_value item;
    napi_get_element(env, argv[1], i, &item);
    if (!(job->scripts[i] = string_arg(env, item))) {
      free_batch(env, job);
      napi_throw_type_error(env, NULL, "scripts must be strings");
      return NULL;
    }
  }
  napi_value name;
  napi_create_string_utf8(env, "ftpnp-nft-batch", NAPI_AUTO_LENGTH, &name);
  if (napi_create_reference(env, argv[0], 1, &job->handle_ref) != napi_ok || napi_create_reference(env, argv[2], 1, &job->callback_ref) != napi_ok ||
      napi_create_async_work(env, NULL, name, batch_execute, batch_complete, job, &job->work) != napi_ok || napi_queue_async_work(env, job->work) != napi_ok) {
    free_batch(env, job);
    napi_throw_error(env, "FTPP_ERR_KERNEL_PATH", "cannot queue the nftables batch");
    return NULL;
  }
  return NULL;
}

void nftables_init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"nftOpen", NULL, nft_open, NULL, NULL, NULL, napi_default, NULL},
      {"nftRun", NULL, nft_run, NULL, NULL, NULL, napi_default, NULL},
      {"nftRunBatch", NULL, nft_run_batch, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
