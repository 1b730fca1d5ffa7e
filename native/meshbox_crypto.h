/* meshbox_crypto.h: the native helper's ABI (see native/README.md). */
#ifndef MESHBOX_CRYPTO_H
#define MESHBOX_CRYPTO_H

#include <stddef.h>
#include <stdint.h>

/* Bumped whenever an exported function changes meaning or signature. */
#define MB_VERSION 1

#define MB_API __attribute__((visibility("default")))

MB_API int mb_version(void);

/* ChaCha20-Poly1305 (RFC 8439).  seal writes ptlen + 16 bytes (ciphertext
 * then tag) to out; open reads ctlen >= 16 bytes and writes ctlen - 16.
 * Both return 0, or -1 (too long, too short, or the tag did not verify, in
 * which case out is left untouched).  out may equal the input pointer. */
MB_API int mb_aead_seal(uint8_t *out, const uint8_t key[32],
                        const uint8_t nonce[12], const uint8_t *ad,
                        size_t adlen, const uint8_t *pt, size_t ptlen);
MB_API int mb_aead_open(uint8_t *out, const uint8_t key[32],
                        const uint8_t nonce[12], const uint8_t *ad,
                        size_t adlen, const uint8_t *ct, size_t ctlen);

/* X25519 (RFC 7748).  The scalar is clamped and the top bit of the point is
 * ignored.  Returns -1 when the result is all zero (a low-order point; out
 * still holds the zeros), else 0. */
MB_API int mb_x25519(uint8_t out[32], const uint8_t scalar[32],
                     const uint8_t point[32]);
MB_API int mb_x25519_base(uint8_t out[32], const uint8_t scalar[32]);

/* BLAKE2s (RFC 7693), keyed when keylen > 0.  outlen 1..32, keylen 0..32;
 * returns -1 on a bad length, else 0. */
MB_API int mb_blake2s(uint8_t *out, size_t outlen, const uint8_t *key,
                      size_t keylen, const uint8_t *in, size_t inlen);

/* 1 when this build carries a NEON path (aarch64, armv7), else 0. */
MB_API int mb_has_neon(void);
/* Turn the NEON path on (1) or off (0); -1 only asks.  Returns whether it is
 * on now.  It starts on for aarch64 and off for armv7, whose caller must
 * first learn from AT_HWCAP that the CPU has NEON. */
MB_API int mb_use_neon(int on);

#ifdef MESHBOX_CRYPTO_INTERNAL
/* XOR nchunks * 256 bytes of in with ChaCha20 keystream (4 blocks at a time)
 * into out, starting at the block counter in state[12], which it advances. */
void mb_chacha20_neon(uint8_t *out, const uint8_t *in, size_t nchunks,
                      uint32_t state[16]);
#endif

#endif
