/*
 * TLS 1.3 record layer for the data relay (tls_record.c): see the comment there.
 */
#ifndef FTPNP_TLS_RECORD_H
#define FTPNP_TLS_RECORD_H

#include <stddef.h>
#include <stdint.h>

/* RFC 8446 §5.1/§5.2: 2^14 bytes of plaintext per record, 2^14 + 256 of ciphertext. */
#define TLS_MAX_PLAINTEXT 16384
#define TLS_MAX_CIPHERTEXT (16384 + 256)
#define TLS_HEADER 5
#define TLS_TAG 16
#define TLS_IV 12

/* One direction of one TLS connection: AEAD key, static IV, record sequence number. */
typedef struct tls_keys tls_keys_t;

/* cipher: 128 or 256 (AES-GCM key bits). NULL on a bad key size or no memory. */
tls_keys_t* tls_keys_new(int bits, const uint8_t* key, size_t key_len, const uint8_t* iv, size_t iv_len, uint64_t seq);
void tls_keys_free(tls_keys_t* k);

/*
 * Protect `n` (<= TLS_MAX_PLAINTEXT) bytes as one TLSCiphertext record of inner type `type`
 * into `out`, which has room for n + TLS_HEADER + 1 + TLS_TAG bytes. Returns the record's
 * length, or -1 (a cipher failure).
 */
long tls_seal(tls_keys_t* k, uint8_t type, const uint8_t* plain, size_t n, uint8_t* out);

/*
 * Remove protection from one whole record (`rec`, header included, `len` bytes) into
 * `plain` (room for TLS_MAX_CIPHERTEXT bytes). Returns the plaintext length with the inner
 * type in *type and the padding removed, or -1: a record that does not authenticate, or
 * holds no inner type (RFC 8446 §5.4: all-zero plaintext is an unexpected_message).
 */
long tls_open(tls_keys_t* k, const uint8_t* rec, size_t len, uint8_t* plain, uint8_t* type);

#endif
