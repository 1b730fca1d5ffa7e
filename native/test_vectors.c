/* test_vectors.c: known answers and edge cases for the native helper.
 *
 * Built by `build/native --test` for each architecture and run natively or
 * under qemu-user; it may use libc, the library it links may not.  The AEAD
 * part runs once per available path (portable, then NEON).  Vectors:
 * RFC 8439 2.8.2 and A.5, RFC 7748 5.2 and 6.1, RFC 7693 appendix A and E;
 * the long-message and keyed-BLAKE2s answers were computed with libsodium
 * (pynacl) and CPython's hashlib.  Prints "N passed, N failed".
 *
 * Usage: test_vectors [--portable-only]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "meshbox_crypto.h"

static int passed, failed, neon_mode;

static void check(int ok, const char *what, long detail)
{
	if (ok) {
		passed++;
		return;
	}
	failed++;
	printf("FAIL [neon=%d] %s (%ld)\n", neon_mode, what, detail);
}

static size_t unhex(uint8_t *out, const char *hex)
{
	size_t n = 0;
	unsigned int byte;

	for (; hex[0] && hex[1]; hex += 2) {
		sscanf(hex, "%2x", &byte);
		out[n++] = (uint8_t)byte;
	}
	return n;
}

static int equals_hex(const uint8_t *got, const char *hex)
{
	uint8_t want[64];
	size_t n = unhex(want, hex);

	return memcmp(got, want, n) == 0;
}

/* The byte pattern gen_kat used: byte i of (n, seed). */
static void fill_pattern(uint8_t *p, size_t n, int seed)
{
	size_t i;

	for (i = 0; i < n; i++)
		p[i] = (uint8_t)(i * 31 + seed * 7 + (i >> 8));
}

static uint32_t rng_state = 0x9e3779b9;

static uint32_t rng(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 17;
	rng_state ^= rng_state << 5;
	return rng_state;
}

static void fill_random(uint8_t *p, size_t n)
{
	while (n--)
		*p++ = (uint8_t)rng();
}

/* ---- ChaCha20-Poly1305 ---- */

static void test_aead_rfc8439(void)
{
	static const char sunscreen[] =
		"Ladies and Gentlemen of the class of '99: If I could offer you "
		"only one tip for the future, sunscreen would be it.";
	static const char drafts[] =
		"Internet-Drafts are draft documents valid for a maximum of six "
		"months and may be updated, replaced, or obsoleted by other "
		"documents at any time. It is inappropriate to use "
		"Internet-Drafts as reference material or to cite them other "
		"than as /\xe2\x80\x9cwork in progress./\xe2\x80\x9d";
	static const char a5_ct[] =
		"64a0861575861af460f062c79be643bd5e805cfd345cf389f108670ac76c8cb2"
		"4c6cfc18755d43eea09ee94e382d26b0bdb7b73c321b0100d4f03b7f355894cf"
		"332f830e710b97ce98c8a84abd0b948114ad176e008d33bd60f982b1ff37c855"
		"9797a06ef4f0ef61c186324e2b3506383606907b6a7c02b0f9f6157b53c867e4"
		"b9166c767b804d46a59b5216cde7a4e99040c5a40433225ee282a1b0a06c523e"
		"af4534d7f83fa1155b0047718cbc546a0d072b04b3564eea1b422273f548271a"
		"0bb2316053fa76991955ebd63159434ecebb4e466dae5a1073a6727627097a10"
		"49e617d91d361094fa68f0ff77987130305beaba2eda04df997b714d6c6f2c29"
		"a6ad5cb4022b02709beead9d67890cbb22392336fea1851f38";
	static const char s_ct[] =
		"d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
		"3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
		"92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
		"3ff4def08e4b7a9de576d26586cec64b61161ae10b594f09e26a7e902ecbd060"
		"0691";
	uint8_t key[32], nonce[12], ad[12], ct[512], want[512], pt[512];
	size_t n, ctlen;
	int i;

	for (i = 0; i < 32; i++)
		key[i] = (uint8_t)(0x80 + i);
	unhex(nonce, "070000004041424344454647");
	unhex(ad, "50515253c0c1c2c3c4c5c6c7");
	n = strlen(sunscreen);
	ctlen = unhex(want, s_ct);
	check(mb_aead_seal(ct, key, nonce, ad, 12, (const uint8_t *)sunscreen,
			   n) == 0 && ctlen == n + 16 &&
	      memcmp(ct, want, ctlen) == 0, "RFC 8439 2.8.2 seal", 0);
	check(mb_aead_open(pt, key, nonce, ad, 12, want, ctlen) == 0 &&
	      memcmp(pt, sunscreen, n) == 0, "RFC 8439 2.8.2 open", 0);

	unhex(key, "1c9240a5eb55d38af333888604f6b5f0473917c1402b80099dca5cbc207075c0");
	unhex(nonce, "000000000102030405060708");
	unhex(ad, "f33388860000000000004e91");
	ctlen = unhex(ct, a5_ct);
	n = strlen(drafts);
	check(ctlen == n + 16 && mb_aead_open(pt, key, nonce, ad, 12, ct,
					      ctlen) == 0 &&
	      memcmp(pt, drafts, n) == 0, "RFC 8439 A.5 open", 0);
	check(mb_aead_seal(want, key, nonce, ad, 12, (const uint8_t *)drafts,
			   n) == 0 && memcmp(want, ct, ctlen) == 0,
	      "RFC 8439 A.5 seal", 0);
}

/* {ptlen, adlen, BLAKE2s-256 of the sealed output}, from libsodium. */
static const struct {
	size_t ptlen, adlen;
	const char *digest;
} aead_lengths[] = {
	{0, 0, "92be8dddaf3c4d8b4beb84d7419169f5ab09844e8f537095342c2a9470c6b56d"},
	{1, 1, "20c4372276d9f7ed16732b12c0cda112f6ec04d54fb5e782d6290166ae7f6453"},
	{15, 15, "fd4e42cdf04b1bb27b92ef11bc71e42760de5d620a4addcd9487b92040cd9aa7"},
	{16, 16, "e0ca6b349663e4e2d7f7f66fbb5f729ade0cda4e566c34316655f5dfa778d3b8"},
	{17, 17, "4318d5da4f4479555cbad0f920384138e6ddba2b7203f7c0bda1fc4cf863ea98"},
	{63, 26, "84701fd87e3bd9e613826158d279e055e43dd491649f9512c3b508850107c424"},
	{64, 27, "b62b1881287c5eb5314b043eef940bc3420be8a08661610ab3fe8cceacd23873"},
	{65, 28, "4960613c3e93cceaf7adf7714748335352ca6080f50426161b04e46e8cac7b8d"},
	{127, 16, "d629747b99488ef0f5dfd40280fdf8538524c1f7c2d130031501daaccd98a3b7"},
	{128, 17, "19058a05dbcf28762f1a919e61e30167a89bcdeca690039ae10457578efe0da7"},
	{129, 18, "703338c41f184b02732bb02ade721bea81bb30e5652502ba76447f36c2296415"},
	{255, 33, "67f630c8fdb2cbf5fa93b5338aeeb502486bc6756d0929be210fe2a9d2e17515"},
	{256, 34, "7a37b5bdcf9d134c0940f93ea382f88ff2b6dd6f23a4b39f4f816dffa5b05733"},
	{257, 35, "dacfb9c4d893b9998b6871bcd4fd0ec17ee732c860c4848f22c8797fbdfd7094"},
	{511, 30, "5465c2e546019aec87e0a50b966e291cd8dcae046b946098728854b832c2f7ac"},
	{512, 31, "f9d4e7493179391cdfea06c67b32c923319cf50299ba40faba68760360850e23"},
	{513, 32, "18e9ec90548b6103d4d655954eff222cb63cbe6dfe3169e0978963550c63f36d"},
	{767, 27, "b5c52c36ef8742651b3bbaaaf350bd77e574617223904bb4f8063f496f7b75cf"},
	{768, 28, "6690482ae6321dbbe4e764fe5e02a529cfcde32494193003f00f02f7b46a5630"},
	{1000, 1, "b80f54aa76392347dd638a0266d9950a07291621bb1b7cf6c1b3009d6c5a00fa"},
	{1023, 24, "7b28f70f0cdeefb86066783c66d267facd991faecaae979f608991fc18f9e8d6"},
	{1024, 25, "58e9a817f21f3a8ad6ac82ae9ea7da9a22af4a48d7cba5a4610a0a9e9a7457c2"},
	{1025, 26, "1668b1ddb8c20fa26b16bbf89a3fbcdde67281bfe5dcd846a0e6733cccd69094"},
	{1400, 31, "50cf1f85f5c05cff43b8f58b3210947987e65caa93b6f764046fc1d140d4f370"},
	{4096, 26, "71db4a3605caa9334eee410b5e63eb8ada06c4d8ad4631020c79d4b377951f44"},
	{65543, 16, "abeee4428c7793fde74f3e3e7acac36fc49af530c37ac4d3e50b67b8e55ec544"},
};

static void test_aead_lengths(void)
{
	size_t i, n, k;
	uint8_t key[32], nonce[12], ad[64], digest[32], *pt, *ct, *back;

	for (i = 0; i < sizeof aead_lengths / sizeof aead_lengths[0]; i++) {
		n = aead_lengths[i].ptlen;
		pt = malloc(n + 1);
		ct = malloc(n + 16);
		back = malloc(n + 16);
		fill_pattern(key, 32, (int)n + 1);
		fill_pattern(nonce, 12, (int)n + 2);
		fill_pattern(ad, aead_lengths[i].adlen, (int)n + 3);
		fill_pattern(pt, n, (int)n + 4);
		mb_aead_seal(ct, key, nonce, ad, aead_lengths[i].adlen, pt, n);
		mb_blake2s(digest, 32, NULL, 0, ct, n + 16);
		check(equals_hex(digest, aead_lengths[i].digest),
		      "seal matches libsodium", (long)n);
		check(mb_aead_open(back, key, nonce, ad, aead_lengths[i].adlen,
				   ct, n + 16) == 0 && memcmp(back, pt, n) == 0,
		      "open round trip", (long)n);
		/* In place, both ways. */
		for (k = 0; k < n; k++)
			back[k] = pt[k];
		mb_aead_seal(back, key, nonce, ad, aead_lengths[i].adlen, back, n);
		check(memcmp(back, ct, n + 16) == 0, "seal in place", (long)n);
		check(mb_aead_open(back, key, nonce, ad, aead_lengths[i].adlen,
				   back, n + 16) == 0 && memcmp(back, pt, n) == 0,
		      "open in place", (long)n);
		free(pt);
		free(ct);
		free(back);
	}
}

/* Opens a tampered message and checks it fails without touching out. */
static void expect_rejected(const uint8_t *key, const uint8_t *nonce,
			    const uint8_t *ad, size_t adlen,
			    const uint8_t *ct, size_t ctlen, const char *what,
			    long detail)
{
	static uint8_t out[2048];
	size_t i;
	int untouched = 1;

	memset(out, 0xa5, sizeof out);
	check(mb_aead_open(out, key, nonce, ad, adlen, ct, ctlen) == -1,
	      what, detail);
	for (i = 0; i < sizeof out; i++)
		untouched &= out[i] == 0xa5;
	check(untouched, "failed open leaves out untouched", detail);
}

static void test_aead_tampering(void)
{
	static const size_t lens[] = {0, 1, 64, 300, 1400};
	uint8_t key[32], nonce[12], ad[40], ct[1500], bad[1500];
	size_t li, n, bit, adlen = 20;

	for (li = 0; li < sizeof lens / sizeof lens[0]; li++) {
		n = lens[li];
		fill_random(key, 32);
		fill_random(nonce, 12);
		fill_random(ad, sizeof ad);
		fill_random(bad, n);
		mb_aead_seal(ct, key, nonce, ad, adlen, bad, n);

		for (bit = 0; bit < 128; bit++) { /* every tag bit */
			memcpy(bad, ct, n + 16);
			bad[n + bit / 8] ^= (uint8_t)(1u << (bit % 8));
			expect_rejected(key, nonce, ad, adlen, bad, n + 16,
					"flipped tag bit", (long)bit);
		}
		if (n > 0) { /* first, middle and last ciphertext byte */
			size_t at[3] = {0, n / 2, n - 1}, j;

			for (j = 0; j < 3; j++) {
				memcpy(bad, ct, n + 16);
				bad[at[j]] ^= 0x01;
				expect_rejected(key, nonce, ad, adlen, bad, n + 16,
						"flipped ciphertext bit", (long)at[j]);
			}
		}
		ad[3] ^= 0x80;
		expect_rejected(key, nonce, ad, adlen, ct, n + 16,
				"tampered AD", (long)n);
		ad[3] ^= 0x80;
		expect_rejected(key, nonce, ad, adlen + 1, ct, n + 16,
				"AD one byte longer", (long)n);
		expect_rejected(key, nonce, ad, adlen - 1, ct, n + 16,
				"AD one byte shorter", (long)n);
		nonce[11] ^= 1;
		expect_rejected(key, nonce, ad, adlen, ct, n + 16,
				"other nonce", (long)n);
		nonce[11] ^= 1;
		key[0] ^= 1;
		expect_rejected(key, nonce, ad, adlen, ct, n + 16,
				"other key", (long)n);
		key[0] ^= 1;
		expect_rejected(key, nonce, ad, adlen, ct, n + 15,
				"truncated", (long)n);
		check(mb_aead_open(bad, key, nonce, ad, adlen, ct, n + 16) == 0,
		      "untampered still opens", (long)n);
	}
	expect_rejected(key, nonce, ad, adlen, ct, 15, "shorter than a tag", 15);
	expect_rejected(key, nonce, ad, adlen, ct, 0, "empty ciphertext", 0);
}

/* The NEON path must give the same bytes as the portable one. */
static void test_neon_matches_portable(void)
{
	static uint8_t pt[5000], a[5016], b[5016];
	uint8_t key[32], nonce[12], ad[16];
	int i;
	size_t n;

	for (i = 0; i < 300; i++) {
		/* First around every multiple of 64, then anywhere. */
		n = i < 60 ? (size_t)i * 64 + rng() % 3 : rng() % sizeof pt;
		n = n > 0 ? n - 1 : 0;
		fill_random(key, 32);
		fill_random(nonce, 12);
		fill_random(ad, 16);
		fill_random(pt, n);
		mb_use_neon(0);
		mb_aead_seal(a, key, nonce, ad, 16, pt, n);
		mb_use_neon(1);
		mb_aead_seal(b, key, nonce, ad, 16, pt, n);
		check(memcmp(a, b, n + 16) == 0, "NEON seal equals portable",
		      (long)n);
	}
}

/* ---- X25519 ---- */

static void test_x25519_rfc7748(void)
{
	uint8_t k[32], u[32], out[32], a_pub[32], b_pub[32], s1[32], s2[32];
	uint8_t a[32], b[32];
	int i;

	unhex(k, "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4");
	unhex(u, "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c");
	check(mb_x25519(out, k, u) == 0 && equals_hex(out,
	      "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"),
	      "RFC 7748 5.2 vector 1", 0);
	/* This u has its top bit set, which must be ignored. */
	unhex(k, "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d");
	unhex(u, "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493");
	check(mb_x25519(out, k, u) == 0 && equals_hex(out,
	      "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957"),
	      "RFC 7748 5.2 vector 2", 0);

	memset(k, 0, 32);
	k[0] = 9;
	memcpy(u, k, 32);
	for (i = 1; i <= 1000; i++) {
		mb_x25519(out, k, u);
		memcpy(u, k, 32);
		memcpy(k, out, 32);
		if (i == 1)
			check(equals_hex(k, "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079"),
			      "RFC 7748 5.2 after 1 iteration", 1);
	}
	check(equals_hex(k, "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"),
	      "RFC 7748 5.2 after 1000 iterations", 1000);

	unhex(a, "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
	unhex(b, "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb");
	mb_x25519_base(a_pub, a);
	mb_x25519_base(b_pub, b);
	check(equals_hex(a_pub, "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"),
	      "RFC 7748 6.1 Alice public", 0);
	check(equals_hex(b_pub, "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"),
	      "RFC 7748 6.1 Bob public", 0);
	mb_x25519(s1, a, b_pub);
	mb_x25519(s2, b, a_pub);
	check(equals_hex(s1, "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742") &&
	      memcmp(s1, s2, 32) == 0, "RFC 7748 6.1 shared secret", 0);
}

/* Low-order u-coordinates (0, 1, the two of order 8, p - 1), also as
 * u + p and with bit 255 set; every one must give all zeros and -1. */
static const char *const low_order[] = {
	"0000000000000000000000000000000000000000000000000000000000000000",
	"0100000000000000000000000000000000000000000000000000000000000000",
	"e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
	"5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
	"ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
	"edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
	"eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
	"0000000000000000000000000000000000000000000000000000000000000080",
	"0100000000000000000000000000000000000000000000000000000000000080",
	"e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b880",
	"5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f11d7",
	"ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
	"edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
	"eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
};

static void test_x25519_edges(void)
{
	static const uint8_t zero[32];
	uint8_t k[32], u[32], v[32], o1[32], o2[32], pa[32], pb[32], b[32];
	size_t i;
	int j;

	for (i = 0; i < sizeof low_order / sizeof low_order[0]; i++) {
		fill_random(k, 32);
		unhex(u, low_order[i]);
		memset(o1, 0x5a, 32);
		check(mb_x25519(o1, k, u) == -1 && memcmp(o1, zero, 32) == 0,
		      "low-order point gives zeros and -1", (long)i);
	}
	/* u + p (non-canonical, still below 2^255) acts as u. */
	for (j = 2; j < 19; j++) {
		fill_random(k, 32);
		memset(u, 0, 32);
		u[0] = (uint8_t)j;
		memset(v, 0xff, 32);
		v[0] = (uint8_t)(0xed + j);
		v[31] = 0x7f;
		mb_x25519(o1, k, u);
		mb_x25519(o2, k, v);
		check(memcmp(o1, o2, 32) == 0, "u + p equals u", j);
	}
	/* Bit 255 is masked; base-point mult equals mult by u = 9. */
	for (j = 0; j < 20; j++) {
		fill_random(k, 32);
		fill_random(u, 32);
		u[31] &= 0x7f;
		memcpy(v, u, 32);
		v[31] |= 0x80;
		mb_x25519(o1, k, u);
		mb_x25519(o2, k, v);
		check(memcmp(o1, o2, 32) == 0, "top bit of u ignored", j);
		memset(u, 0, 32);
		u[0] = 9;
		mb_x25519(o1, k, u);
		mb_x25519_base(o2, k);
		check(memcmp(o1, o2, 32) == 0, "base equals u = 9", j);
		/* Diffie-Hellman agrees both ways (and outputs are canonical). */
		fill_random(b, 32);
		mb_x25519_base(pa, k);
		mb_x25519_base(pb, b);
		mb_x25519(o1, k, pb);
		mb_x25519(o2, b, pa);
		check(memcmp(o1, o2, 32) == 0 && (o1[31] & 0x80) == 0,
		      "random Diffie-Hellman agrees", j);
	}
}

/* ---- BLAKE2s ---- */

/* RFC 7693 appendix E: deterministic input of len bytes. */
static void selftest_seq(uint8_t *out, size_t len, uint32_t seed)
{
	uint32_t a = 0xdead4bad * seed, b = 1, t;
	size_t i;

	for (i = 0; i < len; i++) {
		t = a + b;
		a = b;
		b = t;
		out[i] = (uint8_t)(t >> 24);
	}
}

static const struct {
	size_t keylen, inlen, outlen;
	const char *digest;
} blake2s_keyed[] = {
	{32, 0, 32, "48a8997da407876b3d79c0d92325ad3b89cbb754d86ab71aee047ad345fd2c49"},
	{32, 1, 32, "40d15fee7c328830166ac3f918650f807e7e01e177258cdc0a39b11f598066f1"},
	{32, 63, 32, "c65382513f07460da39833cb666c5ed82e61b9e998f4b0c4287cee56c3cc9bcd"},
	{32, 64, 32, "8975b0577fd35566d750b362b0897a26c399136df07bababbde6203ff2954ed4"},
	{32, 65, 32, "21fe0ceb0052be7fb0f004187cacd7de67fa6eb0938d927677f2398c132317a8"},
	{1, 64, 16, "2ba2b6488a75dba441264fb7e2aec115"},
	{16, 128, 32, "ad40caaba7d52b5e44a472da2ba8b9a727afc4983db5d9989dd93c464c9e384a"},
	{32, 129, 1, "ad"},
	{7, 1000, 31, "6b9cd622abe2432cd5cd9ba328b84efd6d0bd269f781e8397557408729b234"},
	{0, 64, 32, "56f34e8b96557e90c1f24b52d0c89d51086acf1b00f634cf1dde9233b8eaaa3e"},
	{0, 128, 32, "1fa877de67259d19863a2a34bcc6962a2b25fcbf5cbecd7ede8f1fa36688a796"},
	{0, 129, 20, "844da1b7c83cef2f35fc1433c5990161e3202c9d"},
};

static void test_blake2s(void)
{
	static const size_t outlens[4] = {16, 20, 28, 32};
	static const size_t inlens[6] = {0, 3, 64, 65, 255, 1024};
	uint8_t in[1024], key[32], md[32], all[2 * 4 * 6 * 32];
	size_t i, j, n = 0;

	mb_blake2s(md, 32, NULL, 0, (const uint8_t *)"abc", 3);
	check(equals_hex(md, "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982"),
	      "RFC 7693 appendix B: abc", 0);

	for (i = 0; i < 4; i++) {
		for (j = 0; j < 6; j++) {
			selftest_seq(in, inlens[j], (uint32_t)inlens[j]);
			mb_blake2s(all + n, outlens[i], NULL, 0, in, inlens[j]);
			n += outlens[i];
			selftest_seq(key, outlens[i], (uint32_t)outlens[i]);
			mb_blake2s(all + n, outlens[i], key, outlens[i], in,
				   inlens[j]);
			n += outlens[i];
		}
	}
	mb_blake2s(md, 32, NULL, 0, all, n);
	check(equals_hex(md, "6a411f08ce25adcdfb02aba641451cec53c598b24f4fc787fbdc88797f4c1dfe"),
	      "RFC 7693 appendix E self-test", 0);

	for (i = 0; i < sizeof blake2s_keyed / sizeof blake2s_keyed[0]; i++) {
		for (j = 0; j < blake2s_keyed[i].keylen; j++)
			key[j] = (uint8_t)j;
		for (j = 0; j < blake2s_keyed[i].inlen; j++)
			in[j] = (uint8_t)j;
		memset(md, 0, 32);
		check(mb_blake2s(md, blake2s_keyed[i].outlen, key,
				 blake2s_keyed[i].keylen, in,
				 blake2s_keyed[i].inlen) == 0 &&
		      equals_hex(md, blake2s_keyed[i].digest) &&
		      (blake2s_keyed[i].outlen == 32 ||
		       md[blake2s_keyed[i].outlen] == 0),
		      "BLAKE2s matches hashlib", (long)i);
	}
	check(mb_blake2s(md, 0, NULL, 0, in, 1) == -1, "outlen 0 refused", 0);
	check(mb_blake2s(md, 33, NULL, 0, in, 1) == -1, "outlen 33 refused", 33);
	check(mb_blake2s(md, 32, key, 33, in, 1) == -1, "keylen 33 refused", 33);
}

int main(int argc, char **argv)
{
	int portable_only = argc > 1 && strcmp(argv[1], "--portable-only") == 0;
	int modes = mb_has_neon() && !portable_only ? 2 : 1;

	check(mb_version() == MB_VERSION, "mb_version", mb_version());
	for (neon_mode = 0; neon_mode < modes; neon_mode++) {
		check(mb_use_neon(neon_mode) == neon_mode, "mb_use_neon", 0);
		test_aead_rfc8439();
		test_aead_lengths();
		test_aead_tampering();
	}
	neon_mode = 0;
	mb_use_neon(0);
	if (modes == 2)
		test_neon_matches_portable();
	else
		check(mb_use_neon(1) == 0 || portable_only,
		      "NEON cannot be turned on without a NEON path", 0);
	mb_use_neon(0);
	test_x25519_rfc7748();
	test_x25519_edges();
	test_blake2s();
	printf("neon paths tested: %s\n", modes == 2 ? "portable, neon" : "portable");
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
