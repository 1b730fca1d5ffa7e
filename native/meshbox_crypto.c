/* meshbox_crypto.c: ChaCha20-Poly1305, X25519 and BLAKE2s, freestanding.
 *
 * No libc: the library must load unchanged under glibc and musl, so it
 * imports no symbol at all (build/native checks this).  Everything secret
 * is handled in constant time: no branch or table index depends on a key,
 * a scalar, a plaintext or a tag.  Right shifts of negative int64_t values
 * are arithmetic, as GCC and Clang define them.
 */
#define MESHBOX_CRYPTO_INTERNAL
#include "meshbox_crypto.h"

/* ---- Byte helpers ---- */

static uint32_t load_le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
	       (uint32_t)p[3] << 24;
}

static void store_le32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
	p[2] = (uint8_t)(v >> 16);
	p[3] = (uint8_t)(v >> 24);
}

static void store_le64(uint8_t *p, uint64_t v)
{
	store_le32(p, (uint32_t)v);
	store_le32(p + 4, (uint32_t)(v >> 32));
}

static void copy_bytes(uint8_t *dst, const uint8_t *src, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		dst[i] = src[i];
}

/* Zeroes secrets; the volatile store keeps the compiler from dropping it. */
static void wipe(void *p, size_t n)
{
	volatile uint8_t *v = (volatile uint8_t *)p;
	size_t i;

	for (i = 0; i < n; i++)
		v[i] = 0;
}

static uint32_t rotl32(uint32_t v, int n)
{
	return (v << n) | (v >> (32 - n));
}

static uint32_t rotr32(uint32_t v, int n)
{
	return (v >> n) | (v << (32 - n));
}

/* ---- NEON switch ---- */

#if defined(MB_WITH_NEON)
#if defined(__aarch64__)
static int neon_on = 1;
#else
static int neon_on; /* armv7: the caller checks AT_HWCAP first */
#endif
#endif

MB_API int mb_version(void)
{
	return MB_VERSION;
}

MB_API int mb_has_neon(void)
{
#if defined(MB_WITH_NEON)
	return 1;
#else
	return 0;
#endif
}

MB_API int mb_use_neon(int on)
{
#if defined(MB_WITH_NEON)
	if (on >= 0)
		neon_on = on != 0;
	return neon_on;
#else
	(void)on;
	return 0;
#endif
}

/* ---- ChaCha20 ---- */

#define CHACHA_QUARTER(x, a, b, c, d)                                    \
	do {                                                             \
		x[a] += x[b]; x[d] = rotl32(x[d] ^ x[a], 16);            \
		x[c] += x[d]; x[b] = rotl32(x[b] ^ x[c], 12);            \
		x[a] += x[b]; x[d] = rotl32(x[d] ^ x[a], 8);             \
		x[c] += x[d]; x[b] = rotl32(x[b] ^ x[c], 7);             \
	} while (0)

static void chacha20_init(uint32_t state[16], const uint8_t key[32],
			  uint32_t counter, const uint8_t nonce[12])
{
	int i;

	state[0] = 0x61707865; /* "expand 32-byte k" */
	state[1] = 0x3320646e;
	state[2] = 0x79622d32;
	state[3] = 0x6b206574;
	for (i = 0; i < 8; i++)
		state[4 + i] = load_le32(key + 4 * i);
	state[12] = counter;
	for (i = 0; i < 3; i++)
		state[13 + i] = load_le32(nonce + 4 * i);
}

static void chacha20_block(uint8_t out[64], const uint32_t state[16])
{
	uint32_t x[16];
	int i;

	for (i = 0; i < 16; i++)
		x[i] = state[i];
	for (i = 0; i < 10; i++) {
		CHACHA_QUARTER(x, 0, 4, 8, 12);
		CHACHA_QUARTER(x, 1, 5, 9, 13);
		CHACHA_QUARTER(x, 2, 6, 10, 14);
		CHACHA_QUARTER(x, 3, 7, 11, 15);
		CHACHA_QUARTER(x, 0, 5, 10, 15);
		CHACHA_QUARTER(x, 1, 6, 11, 12);
		CHACHA_QUARTER(x, 2, 7, 8, 13);
		CHACHA_QUARTER(x, 3, 4, 9, 14);
	}
	for (i = 0; i < 16; i++)
		store_le32(out + 4 * i, x[i] + state[i]);
	wipe(x, sizeof x);
}

/* XOR len bytes of in with the keystream from block state[12] on. */
static void chacha20_xor(uint8_t *out, const uint8_t *in, size_t len,
			 uint32_t state[16])
{
	uint8_t stream[64];
	size_t i, take;

#if defined(MB_WITH_NEON)
	if (neon_on && len >= 256) {
		size_t chunks = len / 256;

		mb_chacha20_neon(out, in, chunks, state);
		out += chunks * 256;
		in += chunks * 256;
		len -= chunks * 256;
	}
#endif
	while (len > 0) {
		chacha20_block(stream, state);
		state[12]++;
		take = len < 64 ? len : 64;
		for (i = 0; i < take; i++)
			out[i] = in[i] ^ stream[i];
		out += take;
		in += take;
		len -= take;
	}
	wipe(stream, sizeof stream);
}

/* ---- Poly1305 ---- */
/* Five 26-bit limbs and 32x32->64 products, so armv7 needs no helpers. */

struct poly1305 {
	uint32_t r[5], h[5], pad[4];
};

static void poly1305_init(struct poly1305 *st, const uint8_t key[32])
{
	uint32_t t0 = load_le32(key), t1 = load_le32(key + 4),
		 t2 = load_le32(key + 8), t3 = load_le32(key + 12);
	int i;

	/* Split into limbs and clamp r in one step. */
	st->r[0] = t0 & 0x3ffffff;
	st->r[1] = ((t0 >> 26) | (t1 << 6)) & 0x3ffff03;
	st->r[2] = ((t1 >> 20) | (t2 << 12)) & 0x3ffc0ff;
	st->r[3] = ((t2 >> 14) | (t3 << 18)) & 0x3f03fff;
	st->r[4] = (t3 >> 8) & 0x00fffff;
	for (i = 0; i < 5; i++)
		st->h[i] = 0;
	for (i = 0; i < 4; i++)
		st->pad[i] = load_le32(key + 16 + 4 * i);
}

/* One full 16-byte block (the AEAD zero-pads, so every block is full). */
static void poly1305_block(struct poly1305 *st, const uint8_t m[16])
{
	const uint32_t *r = st->r;
	uint32_t *h = st->h;
	uint32_t s1 = r[1] * 5, s2 = r[2] * 5, s3 = r[3] * 5, s4 = r[4] * 5;
	uint32_t t0 = load_le32(m), t1 = load_le32(m + 4),
		 t2 = load_le32(m + 8), t3 = load_le32(m + 12);
	uint64_t d0, d1, d2, d3, d4;
	uint32_t c;

	h[0] += t0 & 0x3ffffff;
	h[1] += ((t0 >> 26) | (t1 << 6)) & 0x3ffffff;
	h[2] += ((t1 >> 20) | (t2 << 12)) & 0x3ffffff;
	h[3] += ((t2 >> 14) | (t3 << 18)) & 0x3ffffff;
	h[4] += (t3 >> 8) | (1u << 24);

	/* h * r mod 2^130 - 5: limbs past the top wrap around times 5. */
	d0 = (uint64_t)h[0] * r[0] + (uint64_t)h[1] * s4 + (uint64_t)h[2] * s3 +
	     (uint64_t)h[3] * s2 + (uint64_t)h[4] * s1;
	d1 = (uint64_t)h[0] * r[1] + (uint64_t)h[1] * r[0] + (uint64_t)h[2] * s4 +
	     (uint64_t)h[3] * s3 + (uint64_t)h[4] * s2;
	d2 = (uint64_t)h[0] * r[2] + (uint64_t)h[1] * r[1] + (uint64_t)h[2] * r[0] +
	     (uint64_t)h[3] * s4 + (uint64_t)h[4] * s3;
	d3 = (uint64_t)h[0] * r[3] + (uint64_t)h[1] * r[2] + (uint64_t)h[2] * r[1] +
	     (uint64_t)h[3] * r[0] + (uint64_t)h[4] * s4;
	d4 = (uint64_t)h[0] * r[4] + (uint64_t)h[1] * r[3] + (uint64_t)h[2] * r[2] +
	     (uint64_t)h[3] * r[1] + (uint64_t)h[4] * r[0];

	c = (uint32_t)(d0 >> 26); h[0] = (uint32_t)d0 & 0x3ffffff;
	d1 += c; c = (uint32_t)(d1 >> 26); h[1] = (uint32_t)d1 & 0x3ffffff;
	d2 += c; c = (uint32_t)(d2 >> 26); h[2] = (uint32_t)d2 & 0x3ffffff;
	d3 += c; c = (uint32_t)(d3 >> 26); h[3] = (uint32_t)d3 & 0x3ffffff;
	d4 += c; c = (uint32_t)(d4 >> 26); h[4] = (uint32_t)d4 & 0x3ffffff;
	h[0] += c * 5; c = h[0] >> 26; h[0] &= 0x3ffffff;
	h[1] += c;
}

/* MACs data zero-padded to a multiple of 16 bytes, as RFC 8439 2.8 does. */
static void poly1305_padded(struct poly1305 *st, const uint8_t *data,
			    size_t len)
{
	uint8_t last[16];
	size_t i;

	for (; len >= 16; data += 16, len -= 16)
		poly1305_block(st, data);
	if (len == 0)
		return;
	for (i = 0; i < 16; i++)
		last[i] = i < len ? data[i] : 0;
	poly1305_block(st, last);
}

static void poly1305_finish(struct poly1305 *st, uint8_t tag[16])
{
	uint32_t *h = st->h;
	uint32_t g[5], c, keep_g, w[4];
	uint64_t f;
	int i;

	/* Carry fully, then subtract p when h >= p (chosen by mask). */
	c = h[1] >> 26; h[1] &= 0x3ffffff;
	h[2] += c; c = h[2] >> 26; h[2] &= 0x3ffffff;
	h[3] += c; c = h[3] >> 26; h[3] &= 0x3ffffff;
	h[4] += c; c = h[4] >> 26; h[4] &= 0x3ffffff;
	h[0] += c * 5; c = h[0] >> 26; h[0] &= 0x3ffffff;
	h[1] += c;

	g[0] = h[0] + 5; c = g[0] >> 26; g[0] &= 0x3ffffff;
	g[1] = h[1] + c; c = g[1] >> 26; g[1] &= 0x3ffffff;
	g[2] = h[2] + c; c = g[2] >> 26; g[2] &= 0x3ffffff;
	g[3] = h[3] + c; c = g[3] >> 26; g[3] &= 0x3ffffff;
	g[4] = h[4] + c - (1u << 26);
	keep_g = (g[4] >> 31) - 1; /* all ones when h + 5 - 2^130 >= 0 */
	for (i = 0; i < 5; i++)
		h[i] = (h[i] & ~keep_g) | (g[i] & keep_g);

	w[0] = h[0] | (h[1] << 26);
	w[1] = (h[1] >> 6) | (h[2] << 20);
	w[2] = (h[2] >> 12) | (h[3] << 14);
	w[3] = (h[3] >> 18) | (h[4] << 8);
	f = 0;
	for (i = 0; i < 4; i++) {
		f += (uint64_t)w[i] + st->pad[i];
		store_le32(tag + 4 * i, (uint32_t)f);
		f >>= 32;
	}
	wipe(st, sizeof *st);
}

/* ---- ChaCha20-Poly1305 AEAD ---- */

/* RFC 8439 caps a message at 2^32 - 1 blocks after the key block, which
 * only a 64-bit size_t can exceed. */
static int aead_too_long(size_t ptlen)
{
#if SIZE_MAX > 0xffffffffu
	return (uint64_t)ptlen > (uint64_t)0xffffffffu * 64 - 64;
#else
	(void)ptlen;
	return 0;
#endif
}

static void aead_tag(uint8_t tag[16], const uint8_t poly_key[32],
		     const uint8_t *ad, size_t adlen,
		     const uint8_t *ct, size_t ctlen)
{
	struct poly1305 st;
	uint8_t lengths[16];

	poly1305_init(&st, poly_key);
	poly1305_padded(&st, ad, adlen);
	poly1305_padded(&st, ct, ctlen);
	store_le64(lengths, (uint64_t)adlen);
	store_le64(lengths + 8, (uint64_t)ctlen);
	poly1305_block(&st, lengths);
	poly1305_finish(&st, tag);
}

/* Block 0 of the keystream gives the one-time Poly1305 key. */
static void aead_start(uint32_t state[16], uint8_t block0[64],
		       const uint8_t key[32], const uint8_t nonce[12])
{
	chacha20_init(state, key, 0, nonce);
	chacha20_block(block0, state);
	state[12] = 1;
}

MB_API int mb_aead_seal(uint8_t *out, const uint8_t key[32],
			const uint8_t nonce[12], const uint8_t *ad,
			size_t adlen, const uint8_t *pt, size_t ptlen)
{
	uint32_t state[16];
	uint8_t block0[64];

	if (aead_too_long(ptlen))
		return -1;
	aead_start(state, block0, key, nonce);
	chacha20_xor(out, pt, ptlen, state);
	aead_tag(out + ptlen, block0, ad, adlen, out, ptlen);
	wipe(state, sizeof state);
	wipe(block0, sizeof block0);
	return 0;
}

MB_API int mb_aead_open(uint8_t *out, const uint8_t key[32],
			const uint8_t nonce[12], const uint8_t *ad,
			size_t adlen, const uint8_t *ct, size_t ctlen)
{
	uint32_t state[16];
	uint8_t block0[64], tag[16], diff = 0;
	size_t ptlen;
	int i, ok;

	if (ctlen < 16 || aead_too_long(ctlen - 16))
		return -1;
	ptlen = ctlen - 16;
	aead_start(state, block0, key, nonce);
	aead_tag(tag, block0, ad, adlen, ct, ptlen);
	for (i = 0; i < 16; i++)
		diff |= tag[i] ^ ct[ptlen + i];
	ok = ((diff - 1) >> 8) & 1; /* 1 iff diff == 0, without a branch */
	if (ok) /* the tag is public once compared */
		chacha20_xor(out, ct, ptlen, state);
	wipe(state, sizeof state);
	wipe(block0, sizeof block0);
	return ok ? 0 : -1;
}

/* ---- X25519 field ---- */
/* GF(2^255 - 19) in one of two representations, picked at compile time.
 * Where the compiler has a 64x64->128 multiply (x86_64, aarch64): five
 * unsigned 51-bit limbs, four times fewer products.  Elsewhere (armv7):
 * ten signed limbs of alternately 26 and 25 bits with 32x32->64 products.
 * Limb i sits at bit limb_pos(i) and holds limb_bits(i) bits once
 * carried; only the arithmetic differs, the rest is shared. */

#if defined(__SIZEOF_INT128__)
#define FE_LIMBS 5
typedef uint64_t fe_limb;
typedef uint64_t fe_wide; /* a limb with room for carries */
typedef unsigned __int128 fe_product; /* a sum of limb products */

static int limb_bits(int i)
{
	(void)i;
	return 51;
}

static int limb_pos(int i)
{
	return 51 * i;
}
#else
#define FE_LIMBS 10
typedef int32_t fe_limb;
typedef int64_t fe_wide;
typedef int64_t fe_product;

static int limb_bits(int i)
{
	return (i & 1) ? 25 : 26;
}

static int limb_pos(int i)
{
	return 51 * (i >> 1) + 26 * (i & 1);
}
#endif

typedef fe_limb fe[FE_LIMBS];

/* One carry pass; the carry out of the top limb wraps in as * 19. */
static void fe_carry_pass(fe_wide t[FE_LIMBS])
{
	fe_wide c;
	int i;

	for (i = 0; i < FE_LIMBS; i++) {
		c = t[i] >> limb_bits(i);
		t[i] -= c * ((fe_wide)1 << limb_bits(i));
		if (i < FE_LIMBS - 1)
			t[i + 1] += c;
		else
			t[0] += c * 19;
	}
}

#if defined(__SIZEOF_INT128__)
/* fe_mul, fe_sq and fe_mul_small leave limbs below 2^51 (limb 1 below
 * 2^51 + 2^10).  Such limbs, or one fe_add or fe_sub of them, are below
 * 2^53, so every sum of products stays below 2^113 and every carry, even
 * times 19, fits 64 bits. */

#define FE_MASK51 (((uint64_t)1 << 51) - 1)

static void fe_from_wide(fe h, fe_product t[5])
{
	int i;

	for (i = 0; i < 4; i++) {
		t[i + 1] += (uint64_t)(t[i] >> 51);
		h[i] = (uint64_t)t[i] & FE_MASK51;
	}
	h[4] = (uint64_t)t[4] & FE_MASK51;
	h[0] += 19 * (uint64_t)(t[4] >> 51); /* 2^255 = 19 (mod p) */
	h[1] += h[0] >> 51;
	h[0] &= FE_MASK51;
}

static void fe_mul(fe h, const fe f, const fe g)
{
	fe_product t[5];
	uint64_t g19[5];
	int i, j;

	/* Products past the top limb wrap around times 19; scaling g
	 * first keeps them 64x64 multiplies. */
	for (j = 0; j < 5; j++)
		g19[j] = 19 * g[j];
	for (i = 0; i < 5; i++) {
		t[i] = 0;
		for (j = 0; j <= i; j++)
			t[i] += (fe_product)f[j] * g[i - j];
		for (j = i + 1; j < 5; j++)
			t[i] += (fe_product)f[j] * g19[i + 5 - j];
	}
	fe_from_wide(h, t);
}

/* fe_mul(h, f, f) with each cross product computed once and doubled. */
static void fe_sq(fe h, const fe f)
{
	fe_product t[5];
	uint64_t f19[5];
	int i, j;

	for (j = 0; j < 5; j++)
		f19[j] = 19 * f[j];
	for (i = 0; i < 5; i++)
		t[i] = 0;
	for (i = 0; i < 5; i++) {
		t[2 * i % 5] += (fe_product)f[i] * (2 * i < 5 ? f[i] : f19[i]);
		for (j = i + 1; j < 5; j++)
			t[(i + j) % 5] += (fe_product)(2 * f[i]) *
					  (i + j < 5 ? f[j] : f19[j]);
	}
	fe_from_wide(h, t);
}

/* f - g + 2p, so no limb goes negative; g must come from fe_mul or fe_sq
 * (limbs below 2^52 - 38, the smallest limb of 2p). */
static void fe_sub(fe h, const fe f, const fe g)
{
	int i;

	h[0] = f[0] + (2 * FE_MASK51 - 36) - g[0];
	for (i = 1; i < 5; i++)
		h[i] = f[i] + 2 * FE_MASK51 - g[i];
}
#else
/* fe_mul leaves limbs non-negative and below 2^26 (plus a little in limb
 * 1); one fe_add or fe_sub on such limbs keeps every sum in fe_mul below
 * 2^63. */

static void fe_from_wide(fe h, fe_product t[10])
{
	int64_t c;
	int i;

	fe_carry_pass(t);
	c = t[0] >> 26;
	t[0] -= c * ((int64_t)1 << 26);
	t[1] += c;
	for (i = 0; i < 10; i++)
		h[i] = (int32_t)t[i];
}

static void fe_mul(fe h, const fe f, const fe g)
{
	int64_t t[19];
	int32_t g2[10];
	const int32_t *row;
	int i, j;

	/* Two odd limbs multiply to one bit above the limb they land on, so
	 * odd rows use g with its odd limbs doubled. */
	for (j = 0; j < 10; j++)
		g2[j] = (j & 1) ? 2 * g[j] : g[j];
	for (i = 0; i < 19; i++)
		t[i] = 0;
	for (i = 0; i < 10; i++) {
		row = (i & 1) ? g2 : g;
		for (j = 0; j < 10; j++)
			t[i + j] += (int64_t)f[i] * row[j];
	}
	for (i = 0; i < 9; i++) /* 2^255 = 19 (mod p) */
		t[i] += 19 * t[i + 10];
	fe_from_wide(h, t);
}

/* fe_mul(h, f, f) with each cross product computed once and doubled. */
static void fe_sq(fe h, const fe f)
{
	int64_t t[19];
	int32_t f2[10], twice;
	const int32_t *row;
	int i, j;

	for (j = 0; j < 10; j++)
		f2[j] = (j & 1) ? 2 * f[j] : f[j];
	for (i = 0; i < 19; i++)
		t[i] = 0;
	for (i = 0; i < 10; i++) {
		row = (i & 1) ? f2 : f;
		t[2 * i] += (int64_t)f[i] * row[i];
		twice = 2 * f[i];
		for (j = i + 1; j < 10; j++)
			t[i + j] += (int64_t)twice * row[j];
	}
	for (i = 0; i < 9; i++)
		t[i] += 19 * t[i + 10];
	fe_from_wide(h, t);
}

static void fe_sub(fe h, const fe f, const fe g)
{
	int i;

	for (i = 0; i < 10; i++)
		h[i] = f[i] - g[i];
}
#endif

static void fe_mul_small(fe h, const fe f, int32_t k)
{
	fe_product t[FE_LIMBS];
	int i;

	for (i = 0; i < FE_LIMBS; i++)
		t[i] = (fe_product)f[i] * k;
	fe_from_wide(h, t);
}

static void fe_add(fe h, const fe f, const fe g)
{
	int i;

	for (i = 0; i < FE_LIMBS; i++)
		h[i] = f[i] + g[i];
}

static void fe_copy(fe h, const fe f)
{
	int i;

	for (i = 0; i < FE_LIMBS; i++)
		h[i] = f[i];
}

static void fe_set_small(fe h, int32_t v)
{
	int i;

	h[0] = (fe_limb)v;
	for (i = 1; i < FE_LIMBS; i++)
		h[i] = 0;
}

/* Swaps f and g when swap is 1, leaves them when 0, in constant time. */
static void fe_cswap(fe f, fe g, uint32_t swap)
{
	fe_limb mask = -(fe_limb)swap, x;
	int i;

	for (i = 0; i < FE_LIMBS; i++) {
		x = mask & (f[i] ^ g[i]);
		f[i] ^= x;
		g[i] ^= x;
	}
}

/* Bits 0..254 of s; bit 255 falls outside the top limb, which is how a
 * u-coordinate's top bit gets ignored. */
static void fe_from_bytes(fe h, const uint8_t s[32])
{
	int i, k, pos, first, last;
	uint64_t acc;

	for (i = 0; i < FE_LIMBS; i++) {
		pos = limb_pos(i);
		first = pos >> 3;
		last = (pos + limb_bits(i) - 1) >> 3;
		acc = 0;
		for (k = last; k >= first; k--)
			acc = (acc << 8) | s[k];
		h[i] = (fe_limb)((acc >> (pos & 7)) &
				 (((uint64_t)1 << limb_bits(i)) - 1));
	}
}

/* The canonical (fully reduced) little-endian encoding. */
static void fe_to_bytes(uint8_t s[32], const fe f)
{
	fe_wide t[FE_LIMBS], q, c;
	uint64_t acc = 0;
	int i, nbits = 0, n = 0;

	for (i = 0; i < FE_LIMBS; i++)
		t[i] = f[i];
	/* Three passes leave every limb in range, so 0 <= t < 2^255. */
	fe_carry_pass(t);
	fe_carry_pass(t);
	fe_carry_pass(t);
	/* q = 1 iff t >= p, i.e. iff t + 19 carries out of bit 255. */
	q = (t[0] + 19) >> limb_bits(0);
	for (i = 1; i < FE_LIMBS; i++)
		q = (t[i] + q) >> limb_bits(i);
	t[0] += 19 * q;
	for (i = 0; i < FE_LIMBS - 1; i++) {
		c = t[i] >> limb_bits(i);
		t[i] -= c * ((fe_wide)1 << limb_bits(i));
		t[i + 1] += c;
	}
	/* drop the 2^255 that q added */
	t[FE_LIMBS - 1] &= ((fe_wide)1 << limb_bits(FE_LIMBS - 1)) - 1;
	for (i = 0; i < FE_LIMBS; i++) {
		acc |= (uint64_t)t[i] << nbits;
		nbits += limb_bits(i);
		while (nbits >= 8) {
			s[n++] = (uint8_t)acc;
			acc >>= 8;
			nbits -= 8;
		}
	}
	s[n] = (uint8_t)acc; /* the last 7 bits */
}

/* h = f^(2^n), n >= 1. */
static void fe_sq_times(fe h, const fe f, int n)
{
	fe_sq(h, f);
	while (--n > 0)
		fe_sq(h, h);
}

/* z^(p-2) = 1/z.  p - 2 = 2^255 - 21; the chain builds z^(2^k - 1) for
 * k = 5, 10, 20, 40, 50, 100, 200, 250, then shifts in the low bits:
 * 254 squarings and 11 multiplications.  The exponent is public. */
static void fe_invert(fe out, const fe z)
{
	fe z2, z9, z11, x5, x10, x20, x50, x100, t;

	fe_sq(z2, z);
	fe_sq_times(t, z2, 2);
	fe_mul(z9, t, z);
	fe_mul(z11, z9, z2);
	fe_sq(t, z11);
	fe_mul(x5, t, z9); /* 22 + 9 = 2^5 - 1 */
	fe_sq_times(t, x5, 5);
	fe_mul(x10, t, x5);
	fe_sq_times(t, x10, 10);
	fe_mul(x20, t, x10);
	fe_sq_times(t, x20, 20);
	fe_mul(t, t, x20); /* 2^40 - 1 */
	fe_sq_times(t, t, 10);
	fe_mul(x50, t, x10);
	fe_sq_times(t, x50, 50);
	fe_mul(x100, t, x50);
	fe_sq_times(t, x100, 100);
	fe_mul(t, t, x100); /* 2^200 - 1 */
	fe_sq_times(t, t, 50);
	fe_mul(t, t, x50); /* 2^250 - 1 */
	fe_sq_times(t, t, 5); /* 2^255 - 32 */
	fe_mul(out, t, z11);
}

/* ---- X25519 ---- */

MB_API int mb_x25519(uint8_t out[32], const uint8_t scalar[32],
		     const uint8_t point[32])
{
	uint8_t k[32], zero_check = 0;
	fe x1, x2, z2, x3, z3, a, aa, b, bb, e, c, d, da, cb;
	uint32_t swap = 0, bit;
	int i;

	copy_bytes(k, scalar, 32);
	k[0] &= 248;
	k[31] &= 127;
	k[31] |= 64;

	fe_from_bytes(x1, point);
	fe_set_small(x2, 1);
	fe_set_small(z2, 0);
	fe_copy(x3, x1);
	fe_set_small(z3, 1);

	/* The Montgomery ladder of RFC 7748 section 5. */
	for (i = 254; i >= 0; i--) {
		bit = (k[i >> 3] >> (i & 7)) & 1;
		swap ^= bit;
		fe_cswap(x2, x3, swap);
		fe_cswap(z2, z3, swap);
		swap = bit;

		fe_add(a, x2, z2);
		fe_sq(aa, a);
		fe_sub(b, x2, z2);
		fe_sq(bb, b);
		fe_sub(e, aa, bb);
		fe_add(c, x3, z3);
		fe_sub(d, x3, z3);
		fe_mul(da, d, a);
		fe_mul(cb, c, b);
		fe_add(x3, da, cb);
		fe_sq(x3, x3);
		fe_sub(z3, da, cb);
		fe_sq(z3, z3);
		fe_mul(z3, z3, x1);
		fe_mul(x2, aa, bb);
		fe_mul_small(z2, e, 121665); /* a24 = (486662 - 2) / 4 */
		fe_add(z2, z2, aa);
		fe_mul(z2, z2, e);
	}
	fe_cswap(x2, x3, swap);
	fe_cswap(z2, z3, swap);

	fe_invert(z2, z2);
	fe_mul(x2, x2, z2);
	fe_to_bytes(out, x2);

	for (i = 0; i < 32; i++)
		zero_check |= out[i];
	wipe(k, sizeof k);
	wipe(x2, sizeof x2);
	wipe(z2, sizeof z2);
	wipe(x3, sizeof x3);
	wipe(z3, sizeof z3);
	return (((uint32_t)zero_check - 1) >> 8) & 1 ? -1 : 0;
}

MB_API int mb_x25519_base(uint8_t out[32], const uint8_t scalar[32])
{
	static const uint8_t nine[32] = {9};

	return mb_x25519(out, scalar, nine);
}

/* ---- BLAKE2s ---- */

static const uint32_t blake2s_iv[8] = {
	0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
	0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
};

static const uint8_t blake2s_sigma[10][16] = {
	{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
	{14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
	{11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
	{7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
	{9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
	{2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
	{12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
	{13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
	{6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
	{10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
};

#define BLAKE2S_G(v, a, b, c, d, x, y)                                   \
	do {                                                             \
		v[a] += v[b] + (x); v[d] = rotr32(v[d] ^ v[a], 16);      \
		v[c] += v[d];       v[b] = rotr32(v[b] ^ v[c], 12);      \
		v[a] += v[b] + (y); v[d] = rotr32(v[d] ^ v[a], 8);       \
		v[c] += v[d];       v[b] = rotr32(v[b] ^ v[c], 7);       \
	} while (0)

/* Compresses one 64-byte block; count is the bytes hashed so far,
 * including this block's. */
static void blake2s_compress(uint32_t h[8], const uint8_t block[64],
			     uint64_t count, int last)
{
	uint32_t v[16], m[16];
	const uint8_t *s;
	int i;

	for (i = 0; i < 16; i++)
		m[i] = load_le32(block + 4 * i);
	for (i = 0; i < 8; i++) {
		v[i] = h[i];
		v[8 + i] = blake2s_iv[i];
	}
	v[12] ^= (uint32_t)count;
	v[13] ^= (uint32_t)(count >> 32);
	if (last)
		v[14] = ~v[14];
	for (i = 0; i < 10; i++) {
		s = blake2s_sigma[i];
		BLAKE2S_G(v, 0, 4, 8, 12, m[s[0]], m[s[1]]);
		BLAKE2S_G(v, 1, 5, 9, 13, m[s[2]], m[s[3]]);
		BLAKE2S_G(v, 2, 6, 10, 14, m[s[4]], m[s[5]]);
		BLAKE2S_G(v, 3, 7, 11, 15, m[s[6]], m[s[7]]);
		BLAKE2S_G(v, 0, 5, 10, 15, m[s[8]], m[s[9]]);
		BLAKE2S_G(v, 1, 6, 11, 12, m[s[10]], m[s[11]]);
		BLAKE2S_G(v, 2, 7, 8, 13, m[s[12]], m[s[13]]);
		BLAKE2S_G(v, 3, 4, 9, 14, m[s[14]], m[s[15]]);
	}
	for (i = 0; i < 8; i++)
		h[i] ^= v[i] ^ v[8 + i];
	wipe(v, sizeof v);
	wipe(m, sizeof m);
}

/* Copies len (<= 64) bytes into a block, zero-filling the rest. */
static void blake2s_pad(uint8_t block[64], const uint8_t *data, size_t len)
{
	size_t i;

	for (i = 0; i < 64; i++)
		block[i] = i < len ? data[i] : 0;
}

MB_API int mb_blake2s(uint8_t *out, size_t outlen, const uint8_t *key,
		      size_t keylen, const uint8_t *in, size_t inlen)
{
	uint32_t h[8];
	uint8_t block[64], digest[32];
	uint64_t count = 0;
	size_t i;

	if (outlen < 1 || outlen > 32 || keylen > 32)
		return -1;
	for (i = 0; i < 8; i++)
		h[i] = blake2s_iv[i];
	/* Parameter block: digest length, key length, fanout 1, depth 1. */
	h[0] ^= 0x01010000 ^ ((uint32_t)keylen << 8) ^ (uint32_t)outlen;

	/* A key is hashed as a first block of its own, zero-padded.  The
	 * final block (possibly partial, possibly the key block) is
	 * compressed with the last-block flag. */
	if (keylen > 0) {
		blake2s_pad(block, key, keylen);
		count = 64;
		blake2s_compress(h, block, count, inlen == 0);
	}
	for (; inlen > 64; in += 64, inlen -= 64) {
		count += 64;
		blake2s_compress(h, in, count, 0);
	}
	if (inlen > 0 || keylen == 0) {
		blake2s_pad(block, in, inlen);
		count += inlen;
		blake2s_compress(h, block, count, 1);
	}
	for (i = 0; i < 8; i++)
		store_le32(digest + 4 * i, h[i]);
	copy_bytes(out, digest, outlen);
	wipe(h, sizeof h);
	wipe(block, sizeof block);
	wipe(digest, sizeof digest);
	return 0;
}
