// Shared by the product-kernel checks (mmvs_check.cpp, mmqs_check.cpp), included after the
// extracted kernels (it needs their T_* ids and Unit<T>): the quantized types under test, random
// weight rows with valid f16 scales, and the serial reference a row's dot product is held to.
#pragma once
#include <vector>

struct Ty { int t; const char* name; int block, bytes; std::vector<int> f16_at; };

// Every quantized type the decode kernels take: block size, block bytes, offsets of f16 scales.
static std::vector<Ty> quant_types() {
    return {
        {T_Q4_0, "q4_0", 32, 18, {0}}, {T_Q4_1, "q4_1", 32, 20, {0, 2}}, {T_Q5_0, "q5_0", 32, 22, {0}},
        {T_Q5_1, "q5_1", 32, 24, {0, 2}}, {T_Q8_0, "q8_0", 32, 34, {0}}, {T_Q4_K, "q4_k", 256, 144, {0, 2}},
        {T_Q5_K, "q5_k", 256, 176, {0, 2}}, {T_Q6_K, "q6_k", 256, 210, {208}},
    };
}

// f.template operator()<T>() for the type id t of quant_types() (the checks' run<T>).
template <class F> static int with_type(int t, F f) {
    switch (t) {
    case T_Q4_0: return f.template operator()<T_Q4_0>();
    case T_Q4_1: return f.template operator()<T_Q4_1>();
    case T_Q5_0: return f.template operator()<T_Q5_0>();
    case T_Q5_1: return f.template operator()<T_Q5_1>();
    case T_Q8_0: return f.template operator()<T_Q8_0>();
    case T_Q4_K: return f.template operator()<T_Q4_K>();
    case T_Q5_K: return f.template operator()<T_Q5_K>();
    case T_Q6_K: return f.template operator()<T_Q6_K>();
    }
    fprintf(stderr, "unknown type id %d\n", t);
    exit(1);
}

// `rows` rows of `row_bytes` random bytes (16-byte aligned storage), each block's f16 scales set
// to small normal values.
static std::vector<int4> random_weights(const Ty& ty, int rows, size_t row_bytes) {
    std::vector<int4> w((rows * row_bytes) / 16 + 1);
    u8* b = (u8*)w.data();
    for (size_t i = 0; i < rows * row_bytes; i++) b[i] = (u8)rnd();
    for (size_t o = 0; o < rows * row_bytes; o += ty.bytes)
        for (int at : ty.f16_at) { u16 h = f2h(rf() * 0.01f); memcpy(b + o + at, &h, 2); }
    return w;
}

// One row times one token's q8_1 activations, its Unit<T> parts summed serially (the dp4a
// kernels' arithmetic); `scale` gets the sum of the parts' magnitudes (for a relative error).
template <int T>
static double serial_row_dot(const u8* row, int K, const i8* yq, const float2* yds, double* scale) {
    const int units = (T == T_Q4_K || T == T_Q5_K || T == T_Q6_K) ? K / 64 : K / 32;
    double want = 0;
    *scale = 0;
    for (int u = 0; u < units; u++) {
        Unit<T> w;
        w.load(row, u);
        const double v = w.dot(yq, yds);
        want += v;
        *scale += std::fabs(v);
    }
    return want;
}
