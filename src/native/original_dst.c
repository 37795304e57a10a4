/*
 * The original destination of a connection the NAT router redirected to the proxy
 * (transparent interception, issue #13; upstream-selection.md part B), for
 * src/server/original-destination.ts.
 *
 * With `tcp dport 21 redirect to :2121` the kernel rewrites the destination before the
 * proxy's listener sees the SYN; conntrack keeps the original one. getsockopt with
 * SO_ORIGINAL_DST (SOL_IP, answers a sockaddr_in) or IP6T_SO_ORIGINAL_DST (SOL_IPV6,
 * sockaddr_in6) looks the accepted socket's flow up in conntrack and answers the
 * ORIGINAL-direction destination (kernel getorigdst(), net/netfilter/nf_conntrack_proto.c):
 *   - ENOENT when conntrack has no entry for the flow (conntrack not active in this network
 *     namespace, or the entry already gone);
 *   - the socket's own local address when the flow was tracked but not NATed: the caller
 *     compares with getsockname (as SuSE ftp-proxy does) - this file only reports.
 * No capability is needed. Only the default conntrack zone is searched.
 *
 * A dual-stack listener on `::` accepts IPv4 clients as v4-mapped AF_INET6 sockets; their
 * conntrack entry is an IPv4 one, which only the SOL_IP lookup finds (ipv6_getsockopt hands
 * SOL_IP to the IPv4 code, which uses the socket's IPv4 addresses). So an AF_INET6 socket
 * is asked on SOL_IPV6 first, then on SOL_IP.
 *
 * JS interface:
 *   originalDestination(fd) -> { ip: string, port: number } | { errno: number }
 *     ip in inet_ntop form (IPv4 dotted quad from SOL_IP, IPv6 text from SOL_IPV6).
 */
#define _GNU_SOURCE
#define NAPI_VERSION 8
#include <node_api.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

/* From <linux/netfilter_ipv4.h> and <linux/netfilter_ipv6/ip6_tables.h> (both 80): defined
 * here rather than included, as those headers clash with glibc's <netinet/in.h> on some
 * systems. */
#ifndef SO_ORIGINAL_DST
#define SO_ORIGINAL_DST 80
#endif
#ifndef IP6T_SO_ORIGINAL_DST
#define IP6T_SO_ORIGINAL_DST 80
#endif

typedef struct {
  char ip[INET6_ADDRSTRLEN];
  int port;
} destination_t;

/* 0 and *out filled, or an errno. */
static int lookup_v4(int fd, destination_t* out) {
  struct sockaddr_in sin;
  socklen_t len = sizeof sin;
  memset(&sin, 0, sizeof sin);
  if (getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, &sin, &len) != 0) return errno;
  if (len < sizeof sin || sin.sin_family != AF_INET) return EAFNOSUPPORT;
  if (!inet_ntop(AF_INET, &sin.sin_addr, out->ip, sizeof out->ip)) return errno;
  out->port = ntohs(sin.sin_port);
  return 0;
}

static int lookup_v6(int fd, destination_t* out) {
  struct sockaddr_in6 sin6;
  socklen_t len = sizeof sin6;
  memset(&sin6, 0, sizeof sin6);
  if (getsockopt(fd, SOL_IPV6, IP6T_SO_ORIGINAL_DST, &sin6, &len) != 0) return errno;
  if (len < sizeof sin6 || sin6.sin6_family != AF_INET6) return EAFNOSUPPORT;
  if (!inet_ntop(AF_INET6, &sin6.sin6_addr, out->ip, sizeof out->ip)) return errno;
  out->port = ntohs(sin6.sin6_port);
  return 0;
}

static int lookup(int fd, destination_t* out) {
  struct sockaddr_storage local;
  socklen_t len = sizeof local;
  if (getsockname(fd, (struct sockaddr*)&local, &len) != 0) return errno;
  if (local.ss_family == AF_INET) return lookup_v4(fd, out);
  if (local.ss_family != AF_INET6) return EAFNOSUPPORT;
  int err = lookup_v6(fd, out);
  /* Only "no IPv6 entry" sends us to the IPv4 table (a v4-mapped peer); any other failure
   * is the answer. */
  return err == ENOENT ? lookup_v4(fd, out) : err;
}

static napi_value original_destination(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int32_t fd = -1;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 || napi_get_value_int32(env, argv[0], &fd) != napi_ok) {
    napi_throw_type_error(env, NULL, "originalDestination(fd)");
    return NULL;
  }
  destination_t dst;
  memset(&dst, 0, sizeof dst);
  int err = fd < 0 ? EBADF : lookup(fd, &dst);
  napi_value result, value;
  napi_create_object(env, &result);
  if (err != 0) {
    napi_create_int32(env, err, &value);
    napi_set_named_property(env, result, "errno", value);
    return result;
  }
  napi_create_string_utf8(env, dst.ip, NAPI_AUTO_LENGTH, &value);
  napi_set_named_property(env, result, "ip", value);
  napi_create_int32(env, dst.port, &value);
  napi_set_named_property(env, result, "port", value);
  return result;
}

void original_dst_init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"originalDestination", NULL, original_destination, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
