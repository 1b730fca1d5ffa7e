/* chacha20_neon.c: ChaCha20 four blocks at a time with NEON (aarch64, armv7).
 *
 * Vector i holds state word i of four consecutive blocks, one per lane, so
 * the rounds are the scalar ones done on four lanes; a 4x4 transpose then
 * puts each block's words back in order.  Only this file is built with NEON
 * enabled on armv7, so the rest of the library runs on CPUs without it.
 */
#define MESHBOX_CRYPTO_INTERNAL
#include "meshbox_crypto.h"

#include <arm_neon.h>

#define ROTL_V(v, n) vsriq_n_u32(vshlq_n_u32((v), (n)), (v), 32 - (n))
/* A 16-bit rotation is a swap of the two halves of each word. */
#define ROTL16_V(v) \
	vreinterpretq_u32_u16(vrev32q_u16(vreinterpretq_u16_u32(v)))

#define QUARTER_V(x, a, b, c, d)                                         \
	do {                                                             \
		x[a] = vaddq_u32(x[a], x[b]);                            \
		x[d] = ROTL16_V(veorq_u32(x[d], x[a]));                  \
		x[c] = vaddq_u32(x[c], x[d]);                            \
		x[b] = ROTL_V(veorq_u32(x[b], x[c]), 12);                \
		x[a] = vaddq_u32(x[a], x[b]);                            \
		x[d] = ROTL_V(veorq_u32(x[d], x[a]), 8);                 \
		x[c] = vaddq_u32(x[c], x[d]);                            \
		x[b] = ROTL_V(veorq_u32(x[b], x[c]), 7);                 \
	} while (0)

/* XORs 16 bytes of keystream (one row of one block) into out. */
static void xor_row(uint8_t *out, const uint8_t *in, uint32x4_t row)
{
	vst1q_u8(out, veorq_u8(vld1q_u8(in), vreinterpretq_u8_u32(row)));
}

void mb_chacha20_neon(uint8_t *out, const uint8_t *in, size_t nchunks,
		      uint32_t state[16])
{
	static const uint32_t lane_offsets[4] = {0, 1, 2, 3};
	uint32x4_t s[16], x[16], ab0, ab1, cd0, cd1;
	uint32x4x2_t ab, cd;
	int i, g;

	for (; nchunks > 0; nchunks--, in += 256, out += 256) {
		for (i = 0; i < 16; i++)
			s[i] = vdupq_n_u32(state[i]);
		s[12] = vaddq_u32(s[12], vld1q_u32(lane_offsets));
		for (i = 0; i < 16; i++)
			x[i] = s[i];
		for (i = 0; i < 10; i++) {
			QUARTER_V(x, 0, 4, 8, 12);
			QUARTER_V(x, 1, 5, 9, 13);
			QUARTER_V(x, 2, 6, 10, 14);
			QUARTER_V(x, 3, 7, 11, 15);
			QUARTER_V(x, 0, 5, 10, 15);
			QUARTER_V(x, 1, 6, 11, 12);
			QUARTER_V(x, 2, 7, 8, 13);
			QUARTER_V(x, 3, 4, 9, 14);
		}
		for (i = 0; i < 16; i++)
			x[i] = vaddq_u32(x[i], s[i]);
		/* Words 4g..4g+3 of blocks 0..3: transpose the 4x4 tile. */
		for (g = 0; g < 4; g++) {
			ab = vtrnq_u32(x[4 * g], x[4 * g + 1]);
			cd = vtrnq_u32(x[4 * g + 2], x[4 * g + 3]);
			ab0 = ab.val[0]; /* a0 b0 a2 b2 */
			ab1 = ab.val[1]; /* a1 b1 a3 b3 */
			cd0 = cd.val[0];
			cd1 = cd.val[1];
			xor_row(out + 16 * g, in + 16 * g,
				vcombine_u32(vget_low_u32(ab0), vget_low_u32(cd0)));
			xor_row(out + 64 + 16 * g, in + 64 + 16 * g,
				vcombine_u32(vget_low_u32(ab1), vget_low_u32(cd1)));
			xor_row(out + 128 + 16 * g, in + 128 + 16 * g,
				vcombine_u32(vget_high_u32(ab0), vget_high_u32(cd0)));
			xor_row(out + 192 + 16 * g, in + 192 + 16 * g,
				vcombine_u32(vget_high_u32(ab1), vget_high_u32(cd1)));
		}
		state[12] += 4;
	}
}
