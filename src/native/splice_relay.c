/*
 * splice(2) data relay for ftp-nat-proxy (Linux only).
 *
 * The JS relay copies every byte through the event loop: read into a Buffer, write it out,
 * two syscalls and a copy each way per 64 KiB, all on one thread shared with every control
 * connection. Here a paired data channel is handed over once: a thread of its own moves
 * the bytes socket -> pipe -> socket with splice(2), so the payload never enters user
 * space and the event loop only hears about the end.
 *
 * Semantics are those of src/data/relay.ts (protocol.md §3.2, §3.3):
 *   - bytes are counted per direction as they are read from the source socket;
 *   - end of stream on one side (FIN) is passed on as shutdown(SHUT_WR) of the other side
 *     once everything read has been written: a FIN ends only its own direction;
 *   - an error on either socket (ECONNRESET, EPIPE, ...) ends both directions, and both
 *     sockets are closed with SO_LINGER {1, 0} so each peer sees a reset, never a FIN;
 *   - cancel() (abort, idle timeout) stops the thread; the JS side then resets both sockets.
 * The thread works on dup()ed descriptors, so whatever the JS side does with its own
 * descriptors, the thread never touches a number that has been reused for another socket.
 * The kernel socket is closed when the last descriptor goes, after both sides let go.
 *
 * PROT P data (RFC 4217) cannot be spliced: the bytes on each leg are TLS records under that
 * leg's own keys. When Node has established TLS 1.3 with AES-GCM on a leg, the leg comes here
 * with its traffic keys and sequence numbers (src/data/tls-gate.ts) and the thread opens and
 * seals its records itself (tls_pump below, tls_record.c), still one thread per channel and
 * no event-loop work per record.
 *
 * JS interface (see src/data/splice-relay.ts):
 *   start(clientFd, upstreamFd, pipeBytes, onEvent[, clientTls, upstreamTls, clientPending, upstreamPending]) -> handle
 *     clientTls / upstreamTls: null for a plain leg, else that leg's TLS 1.3 state
 *     { bits, readKey, readIv, readSeq, writeKey, writeIv, writeSeq, pending } (tls_leg)
 *     clientPending / upstreamPending: a plain leg's bytes already read into JS (plain_pending)
 *     pipeBytes: capacity asked for each pipe (0: kernel default; -1: no pipe, copy through
 *     a 64 KiB buffer, which is also what happens when no pipe can be made)
 *     onEvent(kind, a, b, c): kind 0 = direction a finished (0 to client, 1 to upstream);
 *                             kind 1 = relay ended: a = 0 complete | 1 error | 2 cancelled,
 *                                      b = errno, c = side of the error (0 client, 1 upstream)
 *   cancel(handle), bytes(handle, direction) -> number, idleMs(handle) -> number
 */
#define _GNU_SOURCE
#define NAPI_VERSION 8
#include <node_api.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "tls_record.h"

enum { DIR_TO_CLIENT = 0, DIR_TO_UPSTREAM = 1 };
enum { SIDE_CLIENT = 0, SIDE_UPSTREAM = 1 };
enum { EV_FINISHED = 0, EV_END = 1 };
enum { END_COMPLETE = 0, END_ERROR = 1, END_CANCELLED = 2 };

#define THREAD_STACK_BYTES (128 * 1024)

typedef struct {
  int src;
  int dst;
  int src_side;
  int dst_side;
  /* Made on the first byte (a download never needs the upload pipe): -1 until then. */
  int pipe_r;
  int pipe_w;
  size_t cap;
  /* Bounce buffer, only if no pipe could be made (descriptor or pipe-page limits). */
  char* buf;
  size_t buf_off;
  /* Bytes read from src and not yet written to dst (in the pipe or the buffer). */
  size_t pending;
  int src_eof;
  int finished;
  _Atomic uint64_t bytes;
  /* TLS 1.3 on either end (PROT P, tls_record.c): records are opened and sealed here
   * instead of spliced. NULL keys: that end is plain. */
  tls_keys_t* rx; /* src is TLS: open its records */
  tls_keys_t* tx; /* dst is TLS: seal into records */
  uint8_t* in;    /* read from src, not yet processed (a TLS src: ciphertext) */
  size_t in_len;
  size_t in_cap;
  uint8_t* out; /* ready for dst */
  size_t out_off;
  size_t out_len;
  uint8_t* scratch; /* one record's plaintext */
  int close_sent;   /* our close_notify is queued (a TLS dst) */
} direction_t;

typedef struct {
  direction_t dir[2];
  int client_fd;   /* dup of the client socket */
  int upstream_fd; /* dup of the upstream socket */
  int cancel_fd;   /* eventfd: wakes the thread for cancel(); closed when the thread ends */
  pthread_mutex_t lock; /* guards cancel_fd against cancel() racing the thread's exit */
  size_t pipe_bytes; /* pipe capacity asked for */
  int no_pipe;       /* pipeBytes -1: always the bounce buffer (tests of that path) */
  _Atomic int cancelled;
  _Atomic int64_t last_activity_ms;
  _Atomic int refs; /* the thread + the JS handle */
  napi_threadsafe_function tsfn;
} relay_t;

typedef struct {
  int kind;
  int a;
  int b;
  int c;
} event_t;

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void close_fd(int* fd) {
  if (*fd >= 0) {
    close(*fd);
    *fd = -1;
  }
}

static void relay_unref(relay_t* r) {
  if (atomic_fetch_sub(&r->refs, 1) == 1) {
    close_fd(&r->cancel_fd);
    pthread_mutex_destroy(&r->lock);
    free(r);
  }
}

static void post(relay_t* r, int kind, int a, int b, int c) {
  event_t* ev = malloc(sizeof *ev);
  if (!ev) return;
  ev->kind = kind;
  ev->a = a;
  ev->b = b;
  ev->c = c;
  if (napi_call_threadsafe_function(r->tsfn, ev, napi_tsfn_blocking) != napi_ok) free(ev);
}

/* An abortive close for whoever closes the socket last (the JS side resets its own too). */
static void arm_reset(int fd) {
  struct linger lg = {1, 0};
  if (fd >= 0) setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
}

static void free_tls(direction_t* x) {
  tls_keys_free(x->rx);
  tls_keys_free(x->tx);
  x->rx = x->tx = NULL;
  free(x->in);
  free(x->out);
  free(x->scratch);
  x->in = x->out = x->scratch = NULL;
}

static int make_pipe(direction_t* x, size_t want) {
  int p[2];
  if (pipe2(p, O_NONBLOCK | O_CLOEXEC) != 0) return -1;
  x->pipe_r = p[0];
  x->pipe_w = p[1];
  if (want > 0) fcntl(p[1], F_SETPIPE_SZ, (int)want); /* best effort: fs.pipe-user-pages-* */
  int size = fcntl(p[1], F_GETPIPE_SZ);
  x->cap = size > 0 ? (size_t)size : 65536;
  return 0;
}

/* First data in a direction: a pipe for splice, or failing that a bounce buffer. */
static int prepare_direction(relay_t* r, direction_t* x) {
  if (x->pipe_r >= 0 || x->buf) return 0;
  if (!r->no_pipe && make_pipe(x, r->pipe_bytes) == 0) return 0;
  x->cap = 65536;
  x->buf = malloc(x->cap);
  if (!x->buf) {
    errno = ENOMEM;
    return -1;
  }
  return 0;
}

/* Read from src into the pipe/buffer: >0 bytes, 0 end of stream, -1 errno (EAGAIN: nothing yet). */
static ssize_t fill(relay_t* r, direction_t* x) {
  if (x->pipe_r < 0 && !x->buf) {
    /* No pipe yet: look without consuming, so an idle or FIN-only direction costs none. */
    char probe;
    ssize_t n = recv(x->src, &probe, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n <= 0) return n;
    if (prepare_direction(r, x) != 0) return -1;
  }
  if (x->buf) {
    if (x->pending > 0) {
      errno = EAGAIN;
      return -1;
    }
    ssize_t n = read(x->src, x->buf, x->cap);
    if (n > 0) x->buf_off = 0;
    return n;
  }
  return splice(x->src, NULL, x->pipe_w, NULL, x->cap - x->pending, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
}

/* Write pending bytes to dst: >0 bytes written, -1 errno (EAGAIN: sink full). */
static ssize_t drain(direction_t* x) {
  if (x->buf) {
    ssize_t m = send(x->dst, x->buf + x->buf_off, x->pending, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (m > 0) x->buf_off += (size_t)m;
    return m;
  }
  return splice(x->pipe_r, NULL, x->dst, NULL, x->pending, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
}


/*
 * A direction with TLS on either end (PROT P data, RFC 4217; tls_record.c). Same contract as
 * the spliced one (counts, FIN, errors), in terms of TLS 1.3 (RFC 8446 §6.1):
 *   - bytes counted are application data (plaintext), like the JS relay's;
 *   - a TLS source ends with close_notify; its TCP FIN without one after application data is
 *     a truncation, an error (the other side gets a reset, so a cut upload is a 426 at the
 *     server, never a 226); before any, a plain end;
 *   - the end is passed on as close_notify (a TLS sink: vsftpd's strict_ssl_read_eof wants
 *     it) and then shutdown(SHUT_WR);
 *   - a source's post-handshake NewSessionTicket is dropped (the data connection's own tickets
 *     are of no use to anyone here); a KeyUpdate, any other handshake message, an alert other
 *     than close_notify/user_canceled, or a record that does not authenticate is an error.
 */
#define TLS_IN_BYTES (65536 + TLS_HEADER + TLS_MAX_CIPHERTEXT)
#define TLS_SEALED_MAX (TLS_HEADER + TLS_MAX_PLAINTEXT + 1 + TLS_TAG)
#define TLS_OUT_BYTES (4 * TLS_SEALED_MAX)
#define TLS_CT_ALERT 21
#define TLS_CT_HANDSHAKE 22
#define TLS_CT_APPLICATION 23
#define TLS_HS_NEW_SESSION_TICKET 4

/* Buffers on first use: a download's upload direction may only ever carry a close_notify. */
static int tls_prepare(direction_t* x, size_t want_in) {
  if (x->out) return 0;
  x->in_cap = want_in > TLS_IN_BYTES ? want_in : TLS_IN_BYTES;
  x->in = malloc(x->in_cap);
  x->out = malloc(TLS_OUT_BYTES);
  x->scratch = malloc(TLS_MAX_CIPHERTEXT);
  if (!x->in || !x->out || !x->scratch) {
    errno = ENOMEM;
    return -1;
  }
  return 0;
}

/* Queue plaintext for dst: sealed into records for a TLS sink, as is for a plain one. */
static int tls_emit(direction_t* x, uint8_t type, const uint8_t* data, size_t n) {
  if (!x->tx) {
    memcpy(x->out + x->out_len, data, n);
    x->out_len += n;
    return 0;
  }
  long m = tls_seal(x->tx, type, data, n, x->out + x->out_len);
  if (m < 0) {
    errno = EPROTO;
    return -1;
  }
  x->out_len += (size_t)m;
  return 0;
}

/* Handshake messages after the handshake: only NewSessionTicket is expected (and dropped). */
static int tls_post_handshake(const uint8_t* p, size_t n) {
  while (n > 0) {
    if (n < 4) return -1;
    size_t len = ((size_t)p[1] << 16) | ((size_t)p[2] << 8) | p[3];
    if (p[0] != TLS_HS_NEW_SESSION_TICKET || len > n - 4) return -1;
    p += 4 + len;
    n -= 4 + len;
  }
  return 0;
}

/*
 * Turn what `in` holds into output while `out` has room for one more record. Returns 1 when
 * something changed, 0 when more input (or room) is needed, -1 on a protocol error (errno).
 * A plain source is sealed in full records; the last, shorter one only when `flush` says no
 * more is coming now. Sealing each read as it came made records as small as the reads (a
 * server's sendfile() arrives in pieces), and every record costs the receiver a decryption
 * call, and Node's TLS a JS callback: TLS client leg downloads ran slower than both-legs ones.
 */
static int tls_transform(direction_t* x, int flush) {
  size_t pos = 0;
  int changed = 0;
  while ((!x->rx || !x->src_eof) && x->out_len + TLS_SEALED_MAX <= TLS_OUT_BYTES) {
    size_t avail = x->in_len - pos;
    if (!x->rx) {
      /* Plain source, TLS sink: seal up to a record's worth. */
      if (avail == 0 || (avail < TLS_MAX_PLAINTEXT && !flush)) break;
      size_t n = avail < TLS_MAX_PLAINTEXT ? avail : TLS_MAX_PLAINTEXT;
      if (tls_emit(x, TLS_CT_APPLICATION, x->in + pos, n) != 0) return -1;
      pos += n;
      changed = 1;
      continue;
    }
    if (avail < TLS_HEADER) break;
    const uint8_t* rec = x->in + pos;
    size_t body = ((size_t)rec[3] << 8) | rec[4];
    /* After the handshake every record is an outer application_data record (§5.2). */
    if (rec[0] != TLS_CT_APPLICATION || body > TLS_MAX_CIPHERTEXT) {
      errno = EPROTO;
      return -1;
    }
    if (avail < TLS_HEADER + body) break;
    uint8_t type = 0;
    long n = tls_open(x->rx, rec, TLS_HEADER + body, x->scratch, &type);
    if (n < 0 || n > TLS_MAX_PLAINTEXT) {
      errno = EBADMSG;
      return -1;
    }
    pos += TLS_HEADER + body;
    changed = 1;
    if (type == TLS_CT_APPLICATION) {
      atomic_fetch_add_explicit(&x->bytes, (uint64_t)n, memory_order_relaxed);
      if (n > 0 && tls_emit(x, TLS_CT_APPLICATION, x->scratch, (size_t)n) != 0) return -1;
    } else if (type == TLS_CT_ALERT) {
      if (n != 2) {
        errno = EPROTO;
        return -1;
      }
      if (x->scratch[1] == 0) {
        /* close_notify: the end of this direction; anything after it is ignored (§6.1). */
        x->src_eof = 1;
        pos = x->in_len;
      } else if (x->scratch[1] != 90) { /* user_canceled comes before a close_notify */
        errno = ECONNRESET;
        return -1;
      }
    } else if (type != TLS_CT_HANDSHAKE || tls_post_handshake(x->scratch, (size_t)n) != 0) {
      errno = EPROTO;
      return -1;
    }
  }
  if (pos > 0) {
    memmove(x->in, x->in + pos, x->in_len - pos);
    x->in_len -= pos;
  }
  return changed;
}

static int tls_pump(relay_t* r, direction_t* x, int d, int* side) {
  int progressed = 0;
  if (x->finished) return 0;
  for (;;) {
    if (!x->out && tls_prepare(x, 0) != 0) {
      *side = x->src_side;
      return -1;
    }
    if (x->out_len > x->out_off) {
      ssize_t m = send(x->dst, x->out + x->out_off, x->out_len - x->out_off, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (m > 0) {
        x->out_off += (size_t)m;
        if (x->out_off == x->out_len) x->out_off = x->out_len = 0;
        progressed = 1;
        atomic_store_explicit(&r->last_activity_ms, now_ms(), memory_order_relaxed);
        continue;
      }
      if (m < 0 && (errno == EAGAIN || errno == EINTR)) {
        x->pending = x->out_len - x->out_off; /* the loop polls dst for POLLOUT */
        return progressed;
      }
      if (m == 0) errno = EPIPE;
      *side = x->dst_side;
      return -1;
    }
    x->pending = 0;
    if (atomic_load_explicit(&r->cancelled, memory_order_relaxed)) return progressed;
    if (x->src_eof && (x->rx || x->in_len == 0)) {
      if (x->tx && !x->close_sent) {
        static const uint8_t close_notify[2] = {1, 0}; /* warning, close_notify */
        if (tls_emit(x, TLS_CT_ALERT, close_notify, sizeof close_notify) != 0) {
          *side = x->dst_side;
          return -1;
        }
        x->close_sent = 1;
        continue;
      }
      if (shutdown(x->dst, SHUT_WR) != 0) {
        *side = x->dst_side;
        return -1;
      }
      x->finished = 1;
      post(r, EV_FINISHED, d, 0, 0);
      return 1;
    }
    int t = tls_transform(x, x->src_eof);
    if (t < 0) {
      *side = x->src_side;
      return -1;
    }
    if (t > 0) {
      progressed = 1;
      continue;
    }
    if (x->src_eof) continue; /* plain source ended: its last bytes were sealed above */
    if (x->in_len == x->in_cap) {
      /* Cannot happen (a full buffer holds whole records); never spin on it. */
      errno = EPROTO;
      *side = x->src_side;
      return -1;
    }
    ssize_t n = recv(x->src, x->in + x->in_len, x->in_cap - x->in_len, MSG_DONTWAIT);
    if (n > 0) {
      x->in_len += (size_t)n;
      if (!x->rx) atomic_fetch_add_explicit(&x->bytes, (uint64_t)n, memory_order_relaxed);
      progressed = 1;
      atomic_store_explicit(&r->last_activity_ms, now_ms(), memory_order_relaxed);
      continue;
    }
    if (n == 0) {
      /* A FIN without close_notify (RFC 8446 §6.1) after application data, or in the middle
       * of a record: the transfer was truncated. Before any data it ends nothing that was
       * sent: clients that download and then close their (empty) upload direction without
       * a close_notify are common, and Node's TLS layer takes that for an end too. */
      if (x->rx && (x->in_len > 0 || atomic_load_explicit(&x->bytes, memory_order_relaxed) > 0)) {
        errno = ECONNRESET;
        *side = x->src_side;
        return -1;
      }
      x->src_eof = 1;
      continue;
    }
    if (errno == EAGAIN || errno == EINTR) {
      /* Nothing more for now: what a plain source sent so far goes out, in a short record. */
      if (!x->rx && x->in_len > 0) {
        if (tls_transform(x, 1) < 0) {
          *side = x->src_side;
          return -1;
        }
        continue;
      }
      return progressed;
    }
    *side = x->src_side;
    return -1;
  }
}

/*
 * Move what can be moved now in one direction. Returns 1 on progress, 0 when blocked,
 * -1 on error (errno and *side set).
 */
static int pump(relay_t* r, int d, int* side) {
  direction_t* x = &r->dir[d];
  int progressed = 0;
  if (x->rx || x->tx) return tls_pump(r, x, d, side);
  if (x->finished) return 0;
  for (;;) {
    int moved = 0;
    if (!x->src_eof && (x->pending < x->cap || x->cap == 0)) {
      ssize_t n = fill(r, x);
      if (n > 0) {
        x->pending += (size_t)n;
        atomic_fetch_add_explicit(&x->bytes, (uint64_t)n, memory_order_relaxed);
        moved = 1;
      } else if (n == 0) {
        x->src_eof = 1;
        moved = 1;
      } else if (errno != EAGAIN && errno != EINTR) {
        *side = x->src_side;
        return -1;
      }
    }
    if (x->pending > 0) {
      ssize_t m = drain(x);
      if (m > 0) {
        x->pending -= (size_t)m;
        moved = 1;
      } else if (m == 0) {
        errno = EPIPE;
        *side = x->dst_side;
        return -1;
      } else if (errno != EAGAIN && errno != EINTR) {
        *side = x->dst_side;
        return -1;
      }
    }
    if (x->src_eof && x->pending == 0) {
      /* Everything read has been written: pass the FIN on, this direction only. */
      if (shutdown(x->dst, SHUT_WR) != 0) {
        *side = x->dst_side;
        return -1;
      }
      x->finished = 1;
      post(r, EV_FINISHED, d, 0, 0);
      return 1;
    }
    if (!moved) return progressed;
    progressed = 1;
    atomic_store_explicit(&r->last_activity_ms, now_ms(), memory_order_relaxed);
    if (atomic_load_explicit(&r->cancelled, memory_order_relaxed)) return progressed;
  }
}

static void* relay_thread(void* arg) {
  relay_t* r = arg;
  int result = END_COMPLETE;
  int err = 0;
  int err_side = 0;
  for (;;) {
    if (atomic_load(&r->cancelled)) {
      result = END_CANCELLED;
      break;
    }
    int failed = 0;
    for (int d = 0; d < 2 && !failed; d++) {
      int side = 0;
      if (pump(r, d, &side) < 0) {
        err = errno;
        err_side = side;
        failed = 1;
      }
    }
    if (failed) {
      result = END_ERROR;
      break;
    }
    if (r->dir[0].finished && r->dir[1].finished) break;
    struct pollfd fds[3];
    int n = 0;
    for (int d = 0; d < 2; d++) {
      direction_t* x = &r->dir[d];
      if (x->finished) continue;
      /* Data waiting in the pipe: wait until the sink can take it (a full pipe also makes
       * the source splice return EAGAIN, so polling the source then would spin). */
      if (x->pending > 0) fds[n++] = (struct pollfd){.fd = x->dst, .events = POLLOUT};
      else if (!x->src_eof) fds[n++] = (struct pollfd){.fd = x->src, .events = POLLIN};
    }
    fds[n++] = (struct pollfd){.fd = r->cancel_fd, .events = POLLIN};
    if (poll(fds, (nfds_t)n, -1) < 0 && errno != EINTR) {
      err = errno;
      result = END_ERROR;
      break;
    }
  }
  if (result != END_COMPLETE) {
    arm_reset(r->client_fd);
    arm_reset(r->upstream_fd);
  }
  close_fd(&r->client_fd);
  close_fd(&r->upstream_fd);
  for (int d = 0; d < 2; d++) {
    close_fd(&r->dir[d].pipe_r);
    close_fd(&r->dir[d].pipe_w);
    free(r->dir[d].buf);
    r->dir[d].buf = NULL;
    free_tls(&r->dir[d]);
  }
  /* Every descriptor goes now, not when the JS handle is garbage-collected. */
  pthread_mutex_lock(&r->lock);
  close_fd(&r->cancel_fd);
  pthread_mutex_unlock(&r->lock);
  post(r, EV_END, result, err, err_side);
  napi_release_threadsafe_function(r->tsfn, napi_tsfn_release);
  relay_unref(r);
  return NULL;
}

/* Runs on the JS thread for every event the relay thread posted. */
static void call_js(napi_env env, napi_value js_cb, void* context, void* data) {
  (void)context;
  event_t* ev = data;
  if (env != NULL && js_cb != NULL) {
    napi_value argv[4], undefined;
    napi_create_int32(env, ev->kind, &argv[0]);
    napi_create_int32(env, ev->a, &argv[1]);
    napi_create_int32(env, ev->b, &argv[2]);
    napi_create_int32(env, ev->c, &argv[3]);
    napi_get_undefined(env, &undefined);
    napi_call_function(env, undefined, js_cb, 4, argv, NULL);
  }
  free(ev);
}

static void finalize_handle(napi_env env, void* data, void* hint) {
  (void)env;
  (void)hint;
  relay_unref((relay_t*)data);
}

static napi_value throw_errno(napi_env env, const char* what, int err) {
  char message[160];
  snprintf(message, sizeof message, "%s: %s", what, strerror(err));
  napi_throw_error(env, "FTPP_ERR_SPLICE", message);
  return NULL;
}


/* Read a Buffer property; NULL (and *len 0) when absent. */
static const uint8_t* buffer_prop(napi_env env, napi_value obj, const char* name, size_t* len) {
  napi_value v;
  bool is_buffer = false;
  void* data = NULL;
  *len = 0;
  if (napi_get_named_property(env, obj, name, &v) != napi_ok || napi_is_buffer(env, v, &is_buffer) != napi_ok || !is_buffer) return NULL;
  if (napi_get_buffer_info(env, v, &data, len) != napi_ok) return NULL;
  return data;
}

static int64_t number_prop(napi_env env, napi_value obj, const char* name) {
  napi_value v;
  int64_t out = -1;
  if (napi_get_named_property(env, obj, name, &v) != napi_ok || napi_get_value_int64(env, v, &out) != napi_ok) return -1;
  return out;
}

/*
 * A leg's TLS state from JS (src/data/splice-relay.ts, TlsLegState): { bits, readKey, readIv,
 * readSeq, writeKey, writeIv, writeSeq, pending }. `pending` is ciphertext the leg's TLS
 * gate read past the handshake; it goes first into the direction that reads this leg.
 * Returns 0 (also for undefined/null: a plain leg), -1 with a message.
 */
static int tls_leg(napi_env env, napi_value value, direction_t* reading, direction_t* writing, const char** what) {
  napi_valuetype type;
  if (napi_typeof(env, value, &type) != napi_ok || type == napi_undefined || type == napi_null) return 0;
  if (type != napi_object) {
    *what = "TLS leg state must be an object";
    return -1;
  }
  int64_t bits = number_prop(env, value, "bits");
  int64_t read_seq = number_prop(env, value, "readSeq");
  int64_t write_seq = number_prop(env, value, "writeSeq");
  size_t rk_len, ri_len, wk_len, wi_len, pending_len;
  const uint8_t* rk = buffer_prop(env, value, "readKey", &rk_len);
  const uint8_t* ri = buffer_prop(env, value, "readIv", &ri_len);
  const uint8_t* wk = buffer_prop(env, value, "writeKey", &wk_len);
  const uint8_t* wi = buffer_prop(env, value, "writeIv", &wi_len);
  const uint8_t* pending = buffer_prop(env, value, "pending", &pending_len);
  if (!rk || !ri || !wk || !wi || read_seq < 0 || write_seq < 0) {
    *what = "TLS leg state needs keys, IVs and sequence numbers";
    return -1;
  }
  reading->rx = tls_keys_new((int)bits, rk, rk_len, ri, ri_len, (uint64_t)read_seq);
  writing->tx = tls_keys_new((int)bits, wk, wk_len, wi, wi_len, (uint64_t)write_seq);
  if (!reading->rx || !writing->tx) {
    *what = "TLS leg state: unsupported cipher or key size";
    return -1;
  }
  if (pending && pending_len > 0) {
    if (tls_prepare(reading, pending_len + TLS_IN_BYTES) != 0) {
      *what = "TLS leg state: no memory";
      return -1;
    }
    memcpy(reading->in, pending, pending_len);
    reading->in_len = pending_len;
  }
  return 0;
}

/*
 * Plaintext a plain leg's socket had already read into JS when the relay took it (the server
 * started sending before the client's TLS handshake was done): it goes first into the
 * direction that reads this leg, which must be sealing for a TLS leg (only that direction
 * has a buffer to put it in; two plain legs are spliced, and take no such bytes).
 */
static int plain_pending(napi_env env, napi_value value, direction_t* reading, const char** what) {
  bool is_buffer = false;
  void* data = NULL;
  size_t len = 0;
  if (napi_is_buffer(env, value, &is_buffer) != napi_ok || !is_buffer) return 0;
  if (napi_get_buffer_info(env, value, &data, &len) != napi_ok || len == 0) return 0;
  if (!reading->tx || reading->rx) {
    *what = "bytes read ahead on a plain leg need a TLS leg on the other side";
    return -1;
  }
  if (tls_prepare(reading, len + TLS_IN_BYTES) != 0) {
    *what = "no memory";
    return -1;
  }
  memcpy(reading->in, data, len);
  reading->in_len = len;
  atomic_fetch_add_explicit(&reading->bytes, (uint64_t)len, memory_order_relaxed);
  return 0;
}

static napi_value start(napi_env env, napi_callback_info info) {
  size_t argc = 8;
  napi_value argv[8];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 4) {
    napi_throw_type_error(env, NULL, "start(clientFd, upstreamFd, pipeBytes, onEvent[, clientTls, upstreamTls, clientPending, upstreamPending])");
    return NULL;
  }
  int32_t client_fd, upstream_fd, pipe_bytes;
  if (napi_get_value_int32(env, argv[0], &client_fd) != napi_ok || napi_get_value_int32(env, argv[1], &upstream_fd) != napi_ok ||
      napi_get_value_int32(env, argv[2], &pipe_bytes) != napi_ok) {
    napi_throw_type_error(env, NULL, "descriptors and pipe size must be numbers");
    return NULL;
  }
  for (int i = 0; i < 2; i++) {
    int fd = i == 0 ? client_fd : upstream_fd;
    int flags = fd >= 0 ? fcntl(fd, F_GETFL) : -1;
    /* libuv keeps its sockets non-blocking; the thread relies on it. */
    if (flags < 0 || !(flags & O_NONBLOCK)) return throw_errno(env, "descriptor is not a non-blocking socket", flags < 0 ? errno : EINVAL);
  }
  relay_t* r = calloc(1, sizeof *r);
  if (!r) return throw_errno(env, "calloc", ENOMEM);
  r->client_fd = r->upstream_fd = r->cancel_fd = -1;
  pthread_mutex_init(&r->lock, NULL);
  for (int d = 0; d < 2; d++) r->dir[d].pipe_r = r->dir[d].pipe_w = -1;
  int err = 0;
  const char* what = "";
  if ((r->client_fd = fcntl(client_fd, F_DUPFD_CLOEXEC, 0)) < 0) what = "dup client";
  else if ((r->upstream_fd = fcntl(upstream_fd, F_DUPFD_CLOEXEC, 0)) < 0) what = "dup upstream";
  else if ((r->cancel_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0) what = "eventfd";
  if (*what) {
    err = errno;
    goto fail;
  }
  r->pipe_bytes = pipe_bytes > 0 ? (size_t)pipe_bytes : 0;
  r->no_pipe = pipe_bytes == -1;
  r->dir[DIR_TO_CLIENT].src = r->upstream_fd;
  r->dir[DIR_TO_CLIENT].dst = r->client_fd;
  r->dir[DIR_TO_CLIENT].src_side = SIDE_UPSTREAM;
  r->dir[DIR_TO_CLIENT].dst_side = SIDE_CLIENT;
  r->dir[DIR_TO_UPSTREAM].src = r->client_fd;
  r->dir[DIR_TO_UPSTREAM].dst = r->upstream_fd;
  r->dir[DIR_TO_UPSTREAM].src_side = SIDE_CLIENT;
  r->dir[DIR_TO_UPSTREAM].dst_side = SIDE_UPSTREAM;
  /* The client leg is read by DIR_TO_UPSTREAM and written by DIR_TO_CLIENT; and vice versa. */
  if ((argc > 4 && tls_leg(env, argv[4], &r->dir[DIR_TO_UPSTREAM], &r->dir[DIR_TO_CLIENT], &what) != 0) ||
      (argc > 5 && tls_leg(env, argv[5], &r->dir[DIR_TO_CLIENT], &r->dir[DIR_TO_UPSTREAM], &what) != 0) ||
      (argc > 6 && plain_pending(env, argv[6], &r->dir[DIR_TO_UPSTREAM], &what) != 0) ||
      (argc > 7 && plain_pending(env, argv[7], &r->dir[DIR_TO_CLIENT], &what) != 0)) {
    err = EINVAL;
    goto fail;
  }
  atomic_store(&r->last_activity_ms, now_ms());
  atomic_store(&r->refs, 2);
  napi_value name;
  napi_create_string_utf8(env, "ftpnp-splice-relay", NAPI_AUTO_LENGTH, &name);
  if (napi_create_threadsafe_function(env, argv[3], NULL, name, 0, 1, NULL, NULL, NULL, call_js, &r->tsfn) != napi_ok) {
    err = EINVAL;
    what = "napi_create_threadsafe_function";
    goto fail;
  }
  napi_value handle;
  if (napi_create_external(env, r, finalize_handle, NULL, &handle) != napi_ok) {
    napi_release_threadsafe_function(r->tsfn, napi_tsfn_abort);
    err = ENOMEM;
    what = "napi_create_external";
    goto fail;
  }
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  pthread_attr_setstacksize(&attr, THREAD_STACK_BYTES);
  pthread_t thread;
  int rc = pthread_create(&thread, &attr, relay_thread, r);
  pthread_attr_destroy(&attr);
  if (rc != 0) {
    /* The handle's finalizer will drop the JS reference; drop the thread's here. */
    napi_release_threadsafe_function(r->tsfn, napi_tsfn_abort);
    close_fd(&r->client_fd);
    close_fd(&r->upstream_fd);
    for (int d = 0; d < 2; d++) {
      close_fd(&r->dir[d].pipe_r);
      close_fd(&r->dir[d].pipe_w);
      free_tls(&r->dir[d]);
    }
    close_fd(&r->cancel_fd);
    relay_unref(r);
    return throw_errno(env, "pthread_create", rc);
  }
  return handle;

fail:
  close_fd(&r->client_fd);
  close_fd(&r->upstream_fd);
  close_fd(&r->cancel_fd);
  for (int d = 0; d < 2; d++) {
    close_fd(&r->dir[d].pipe_r);
    close_fd(&r->dir[d].pipe_w);
    free_tls(&r->dir[d]);
  }
  pthread_mutex_destroy(&r->lock);
  free(r);
  return throw_errno(env, what, err);
}

static relay_t* get_relay(napi_env env, napi_callback_info info, napi_value* argv, size_t want) {
  size_t argc = want;
  void* data = NULL;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < want || napi_get_value_external(env, argv[0], &data) != napi_ok || !data) {
    napi_throw_type_error(env, NULL, "not a relay handle");
    return NULL;
  }
  return data;
}

static napi_value cancel(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  relay_t* r = get_relay(env, info, argv, 1);
  if (!r) return NULL;
  pthread_mutex_lock(&r->lock);
  atomic_store(&r->cancelled, 1);
  if (r->cancel_fd >= 0) {
    uint64_t one = 1;
    ssize_t ignored = write(r->cancel_fd, &one, sizeof one);
    (void)ignored;
  }
  pthread_mutex_unlock(&r->lock);
  return NULL;
}

static napi_value bytes(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  relay_t* r = get_relay(env, info, argv, 2);
  if (!r) return NULL;
  int32_t d = 0;
  napi_get_value_int32(env, argv[1], &d);
  napi_value out;
  napi_create_double(env, (double)atomic_load_explicit(&r->dir[d == 1 ? 1 : 0].bytes, memory_order_relaxed), &out);
  return out;
}

static napi_value idle_ms(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  relay_t* r = get_relay(env, info, argv, 1);
  if (!r) return NULL;
  napi_value out;
  napi_create_double(env, (double)(now_ms() - atomic_load_explicit(&r->last_activity_ms, memory_order_relaxed)), &out);
  return out;
}

void nftables_init(napi_env env, napi_value exports);     /* nftables.c */
void original_dst_init(napi_env env, napi_value exports); /* original_dst.c */

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"start", NULL, start, NULL, NULL, NULL, napi_default, NULL},
      {"cancel", NULL, cancel, NULL, NULL, NULL, napi_default, NULL},
      {"bytes", NULL, bytes, NULL, NULL, NULL, napi_default, NULL},
      {"idleMs", NULL, idle_ms, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  nftables_init(env, exports);
  original_dst_init(env, exports);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
