/*
 * TLS 1.3 record protection (RFC 8446 §5.2-§5.3) for the data relay, with AES-GCM from the
 * OpenSSL that Node itself links (its libcrypto symbols are exported to addons; the headers
 * come with Node's, under include/node/openssl).
 *
 * Why the relay does TLS records itself (issue #12): with PROT P on both legs every byte is
 * decrypted from one TLS connection and encrypted into the other. Node's TLS layer does that
 * on the event loop in 16 KiB pieces, each a JS callback and a Buffer, and measured 3.6 s of
 * CPU per GiB on the bench VM before any relaying; this kernel has no kTLS (CONFIG_TLS) that
 * would let splice(2) carry it. Node still does every handshake (certificates, resumption,
 * the session binding of src/data/tls.ts); only the established TLS 1.3 AES-GCM connection's
 * record layer moves here, with the traffic keys Node derived (src/data/tls-gate.ts).
 *
 * Per record: nonce = static IV XOR the 64-bit sequence number (left-padded, §5.3); the
 * additional data is the 5-byte record header; the plaintext ends with the inner content type
 * followed by optional zero padding (§5.2).
 */
#include "tls_record.h"

#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>

struct tls_keys {
  EVP_CIPHER_CTX* ctx;
  uint8_t iv[TLS_IV];
  uint64_t seq;
  int decrypting; /* the context was last set up for decryption */
  const EVP_CIPHER* cipher;
  uint8_t key[32];
};

tls_keys_t* tls_keys_new(int bits, const uint8_t* key, size_t key_len, const uint8_t* iv, size_t iv_len, uint64_t seq) {
  const EVP_CIPHER* cipher = bits == 128 ? EVP_aes_128_gcm() : bits == 256 ? EVP_aes_256_gcm() : NULL;
  if (!cipher || key_len != (size_t)bits / 8 || iv_len != TLS_IV) return NULL;
  tls_keys_t* k = calloc(1, sizeof *k);
  if (!k) return NULL;
  k->ctx = EVP_CIPHER_CTX_new();
  if (!k->ctx) {
    free(k);
    return NULL;
  }
  k->cipher = cipher;
  memcpy(k->key, key, key_len);
  memcpy(k->iv, iv, TLS_IV);
  k->seq = seq;
  k->decrypting = -1;
  return k;
}

void tls_keys_free(tls_keys_t* k) {
  if (!k) return;
  EVP_CIPHER_CTX_free(k->ctx);
  OPENSSL_cleanse(k->key, sizeof k->key);
  free(k);
}

/* The per-record nonce, and the key schedule set up once per direction of use. */
static int begin(tls_keys_t* k, int decrypting) {
  uint8_t nonce[TLS_IV];
  memcpy(nonce, k->iv, TLS_IV);
  for (int i = 0; i < 8; i++) nonce[TLS_IV - 1 - i] ^= (uint8_t)(k->seq >> (8 * i));
  int ok;
  if (k->decrypting != decrypting) {
    ok = decrypting ? EVP_DecryptInit_ex(k->ctx, k->cipher, NULL, k->key, nonce) : EVP_EncryptInit_ex(k->ctx, k->cipher, NULL, k->key, nonce);
    k->decrypting = decrypting;
  } else {
    /* Same key: only the nonce changes (no key schedule per record). */
    ok = decrypting ? EVP_DecryptInit_ex(k->ctx, NULL, NULL, NULL, nonce) : EVP_EncryptInit_ex(k->ctx, NULL, NULL, NULL, nonce);
  }
  return ok == 1 ? 0 : -1;
}

long tls_seal(tls_keys_t* k, uint8_t type, const uint8_t* plain, size_t n, uint8_t* out) {
  if (n > TLS_MAX_PLAINTEXT) return -1;
  size_t body = n + 1 + TLS_TAG;
  out[0] = 23; /* application_data: every protected record looks alike (§5.2) */
  out[1] = 3;
  out[2] = 3;
  out[3] = (uint8_t)(body >> 8);
  out[4] = (uint8_t)body;
  int len = 0;
  if (begin(k, 0) != 0) return -1;
  if (EVP_EncryptUpdate(k->ctx, NULL, &len, out, TLS_HEADER) != 1) return -1;
  if (n > 0 && EVP_EncryptUpdate(k->ctx, out + TLS_HEADER, &len, plain, (int)n) != 1) return -1;
  if (EVP_EncryptUpdate(k->ctx, out + TLS_HEADER + n, &len, &type, 1) != 1) return -1;
  if (EVP_EncryptFinal_ex(k->ctx, out + TLS_HEADER + n + 1, &len) != 1) return -1;
  if (EVP_CIPHER_CTX_ctrl(k->ctx, EVP_CTRL_GCM_GET_TAG, TLS_TAG, out + TLS_HEADER + n + 1) != 1) return -1;
  k->seq++;
  return (long)(TLS_HEADER + body);
}

long tls_open(tls_keys_t* k, const uint8_t* rec, size_t len, uint8_t* plain, uint8_t* type) {
  if (len < TLS_HEADER + TLS_TAG + 1 || len > TLS_HEADER + TLS_MAX_CIPHERTEXT) return -1;
  size_t n = len - TLS_HEADER - TLS_TAG;
  int out = 0;
  if (begin(k, 1) != 0) return -1;
  if (EVP_DecryptUpdate(k->ctx, NULL, &out, rec, TLS_HEADER) != 1) return -1;
  if (EVP_DecryptUpdate(k->ctx, plain, &out, rec + TLS_HEADER, (int)n) != 1) return -1;
  if (EVP_CIPHER_CTX_ctrl(k->ctx, EVP_CTRL_GCM_SET_TAG, TLS_TAG, (void*)(rec + len - TLS_TAG)) != 1) return -1;
  if (EVP_DecryptFinal_ex(k->ctx, plain + n, &out) != 1) return -1;
  k->seq++;
  /* Strip the zero padding; the last non-zero byte is the real content type. */
  while (n > 0 && plain[n - 1] == 0) n--;
  if (n == 0) return -1;
  *type = plain[n - 1];
  return (long)(n - 1);
}
