// CPU emulation of the CUDA device subset xpcnn's kernels use (tests/ops/emulation).
//
// Included in place of CuPy's device headers (cupy/carray.cuh and friends), so that the
// kernel sources CuPy generates, and the RawKernel sources of xpcnn/ops/fast_cupy.py, compile
// as ordinary C++ with g++. What it keeps of CUDA:
//   - the launch geometry: blockIdx, threadIdx, blockDim, gridDim, so the grid-stride loop
//     (CUPY_FOR) and any row/block partitioning run as written;
//   - CArray and CIndexer with CuPy's indexing rules (flat index on a C-contiguous array,
//     strides otherwise), every access bounds-checked against the array's memory;
//   - __shared__ memory (one copy per kernel, shared by the threads of a block) and
//     __syncthreads(): the threads of a block are cooperative fibers run one at a time in
//     thread order, each up to its next barrier; a barrier is where the scheduler moves to the
//     next thread. A missing barrier therefore makes a thread read shared memory before the
//     others wrote it, every time (not only when the timing is unlucky), and a barrier that
//     not every thread of the block reaches is reported.
// Errors (an out-of-bounds access, a divergent barrier) are recorded, the first one kept, and
// reported by the launcher instead of crashing the process.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__
#define __shared__ static

using std::exp;
using std::expm1;
using std::fabs;
using std::fmax;
using std::fmin;
using std::isfinite;
using std::isinf;
using std::isnan;
using std::log;
using std::log1p;
using std::max;
using std::min;
using std::pow;
using std::sqrt;

struct dim3 {
    unsigned int x, y, z;
};

namespace xpcnn_emu {

inline dim3 thread_index = {0, 0, 0};
inline dim3 block_index = {0, 0, 0};
inline dim3 block_dim = {1, 1, 1};
inline dim3 grid_dim = {1, 1, 1};

inline int failed = 0;
inline char message[512] = "";

inline void fail(const char* text) {
    if (!failed) {
        failed = 1;
        std::snprintf(message, sizeof message, "%s (block %u, thread %u)", text, block_index.x, thread_index.x);
    }
}

inline void fail_index(const char* what, long long index, long long limit) {
    char text[256];
    std::snprintf(text, sizeof text, "%s: index %lld outside [0, %lld)", what, index, limit);
    fail(text);
}

// What the Python side passes for an array argument (mirrored by ctypes in emulator.py).
struct ArrayDesc {
    void* data;
    long long itemsize;
    long long size;
    long long ndim;
    long long shape[16];
    long long strides[16];   // bytes
    long long low;           // the bytes [low, high) around data belong to the array's memory
    long long high;
};

// ------------------------------------------------------------------- cooperative fibers

#if defined(__x86_64__) && !defined(XPCNN_EMU_UCONTEXT)
// A minimal context switch (the callee-saved registers pushed on the fiber's own stack, then
// its stack pointer swapped): ucontext's swapcontext makes a system call for the signal mask at
// every switch, and the product kernels switch at every barrier of every thread.
extern "C" __attribute__((visibility("hidden"))) void xpcnn_emu_switch(void** save_sp, void* load_sp);
extern "C" __attribute__((visibility("hidden"))) void xpcnn_emu_trampoline();
asm(".text\n"
    ".p2align 4\n"
    "xpcnn_emu_switch:\n"
    "    pushq %rbp\n    pushq %rbx\n    pushq %r12\n    pushq %r13\n    pushq %r14\n    pushq %r15\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    popq %r15\n    popq %r14\n    popq %r13\n    popq %r12\n    popq %rbx\n    popq %rbp\n"
    "    ret\n"
    ".p2align 4\n"
    "xpcnn_emu_trampoline:\n"
    "    andq $-16, %rsp\n"
    "    call xpcnn_emu_fiber_main\n"
    "    ud2\n");

struct Context {
    void* sp = nullptr;
};
inline void switch_context(Context& from, Context& to) { xpcnn_emu_switch(&from.sp, to.sp); }
inline void start_context(Context& context, std::vector<char>& stack) {
    void** sp = reinterpret_cast<void**>(
        (reinterpret_cast<uintptr_t>(stack.data() + stack.size()) & ~static_cast<uintptr_t>(15)));
    *--sp = nullptr;                                              // alignment
    *--sp = reinterpret_cast<void*>(&xpcnn_emu_trampoline);       // where the first switch returns
    for (int r = 0; r < 6; ++r) *--sp = nullptr;                  // rbp, rbx, r12-r15
    context.sp = sp;
}
#else
struct Context {
    ucontext_t context;
};
extern "C" void xpcnn_emu_fiber_main();
inline void switch_context(Context& from, Context& to) { swapcontext(&from.context, &to.context); }
inline void start_context(Context& context, std::vector<char>& stack) {
    getcontext(&context.context);
    context.context.uc_stack.ss_sp = stack.data();
    context.context.uc_stack.ss_size = stack.size();
    context.context.uc_link = nullptr;
    makecontext(&context.context, xpcnn_emu_fiber_main, 0);
}
#endif

struct Fiber {
    Context context;
    std::vector<char> stack;
    bool done;
    long long barriers;
};

inline Context scheduler;
inline std::vector<Fiber> fibers;
inline int running = -1;          // the fiber running now; -1 outside a cooperative block
inline void (*fiber_body)() = nullptr;

inline void barrier() {
    if (running < 0) return;      // a serial launch: one thread at a time, nothing to wait for
    Fiber& self = fibers[running];
    self.barriers += 1;
    switch_context(self.context, scheduler);
}

// One block of `threads` threads, each running `body` as a fiber, phase by phase.
inline void run_block(int threads, void (*body)()) {
    const size_t stack_size = 256 * 1024;
    fibers.resize(threads);
    fiber_body = body;
    for (int t = 0; t < threads; ++t) {
        Fiber& f = fibers[t];
        if (f.stack.size() != stack_size) f.stack.assign(stack_size, 0);
        f.done = false;
        f.barriers = 0;
        start_context(f.context, f.stack);
    }
    for (long long phase = 0;; ++phase) {
        int finished = 0;
        for (int t = 0; t < threads; ++t) {
            if (fibers[t].done) { ++finished; continue; }
            thread_index.x = t;
            running = t;
            switch_context(scheduler, fibers[t].context);
            running = -1;
            if (fibers[t].done) ++finished;
        }
        if (finished == threads) break;
        if (finished > 0) {
            thread_index.x = 0;
            fail("__syncthreads() not reached by every thread of the block (divergent barrier)");
            // Let the waiting threads finish so that no fiber is left suspended.
        }
        if (phase > 1000000) { fail("more than 10^6 barriers in one block"); break; }
    }
}

}  // namespace xpcnn_emu

// A fiber's life: the thread's code, then back to the scheduler for good.
extern "C" __attribute__((visibility("hidden"))) void xpcnn_emu_fiber_main() {
    xpcnn_emu::fiber_body();
    xpcnn_emu::fibers[xpcnn_emu::running].done = true;
    xpcnn_emu::switch_context(xpcnn_emu::fibers[xpcnn_emu::running].context, xpcnn_emu::scheduler);
}

namespace xpcnn_emu {

// -------------------------------------------------------------------- CuPy's CArray

template <typename T, int N, bool CContiguous = false, bool Index32 = false>
class CArray {
public:
    static const int ndim = N;
    static const bool c_contiguous = CContiguous;
    typedef typename std::conditional<Index32, int, ptrdiff_t>::type index_t;

    static CArray from(const ArrayDesc* desc) {
        CArray array;
        array.data_ = static_cast<T*>(desc->data);
        array.size_ = desc->size;
        for (int d = 0; d < N; ++d) {
            array.shape_[d] = desc->shape[d];
            array.strides_[d] = desc->strides[d];
        }
        array.low_ = desc->low;
        array.high_ = desc->high;
        return array;
    }

    ptrdiff_t size() const { return size_; }
    const ptrdiff_t* shape() const { return shape_; }
    const ptrdiff_t* strides() const { return strides_; }

    const T& operator[](ptrdiff_t idx) const {
        if (idx < 0 || idx >= size_) {
            fail_index("CArray[i]", idx, size_);
            return dummy();
        }
        if (CContiguous) return at_bytes(static_cast<ptrdiff_t>(idx) * static_cast<ptrdiff_t>(sizeof(T)));
        index_t diff = 0;
        index_t i = static_cast<index_t>(idx);
        for (int d = N - 1; d > 0; --d) {
            const index_t extent = static_cast<index_t>(shape_[d]);
            diff += static_cast<index_t>(strides_[d]) * (i % extent);
            i /= extent;
        }
        if (N > 0) diff += static_cast<index_t>(strides_[0]) * i;
        return at_bytes(diff);
    }
    T& operator[](ptrdiff_t idx) { return const_cast<T&>(static_cast<const CArray&>(*this)[idx]); }

    template <typename Int>
    const T& operator[](const Int (&idx)[N > 0 ? N : 1]) const {
        ptrdiff_t diff = 0;
        for (int d = 0; d < N; ++d) {
            if (idx[d] < 0 || idx[d] >= shape_[d]) {
                fail_index("CArray[index tuple]", static_cast<long long>(idx[d]), shape_[d]);
                return dummy();
            }
            diff += static_cast<ptrdiff_t>(static_cast<index_t>(strides_[d]) * static_cast<index_t>(idx[d]));
        }
        return at_bytes(diff);
    }
    template <typename Int>
    T& operator[](const Int (&idx)[N > 0 ? N : 1]) {
        return const_cast<T&>(static_cast<const CArray&>(*this)[idx]);
    }

private:
    static T& dummy() {
        static T value;
        value = T();
        return value;
    }
    const T& at_bytes(ptrdiff_t offset) const {
        if (offset < low_ || offset + static_cast<ptrdiff_t>(sizeof(T)) > high_) {
            fail_index("CArray byte offset", offset, high_);
            return dummy();
        }
        return *reinterpret_cast<const T*>(reinterpret_cast<const char*>(data_) + offset);
    }

    T* data_ = nullptr;
    ptrdiff_t size_ = 0;
    ptrdiff_t shape_[N > 0 ? N : 1] = {};
    ptrdiff_t strides_[N > 0 ? N : 1] = {};
    ptrdiff_t low_ = 0;
    ptrdiff_t high_ = 0;
};

// ------------------------------------------------------------------ CuPy's CIndexer

template <int N, bool Index32 = false>
class CIndexer {
public:
    static const int ndim = N;
    typedef ptrdiff_t index_t[N > 0 ? N : 1];

    static CIndexer from(const ArrayDesc* desc) {
        CIndexer indexer;
        indexer.size_ = 1;
        for (int d = 0; d < N; ++d) {
            indexer.shape_[d] = desc->shape[d];
            indexer.size_ *= desc->shape[d];
            indexer.index_[d] = 0;
        }
        return indexer;
    }

    ptrdiff_t size() const { return size_; }
    const index_t& get() const { return index_; }

    void set(ptrdiff_t i) {
        if (i < 0 || i >= size_) fail_index("CIndexer.set", i, size_);
        for (int d = N - 1; d > 0; --d) {
            index_[d] = i % shape_[d];
            i /= shape_[d];
        }
        if (N > 0) index_[0] = i;
    }

private:
    ptrdiff_t size_ = 1;
    ptrdiff_t shape_[N > 0 ? N : 1] = {};
    index_t index_ = {};
};

}  // namespace xpcnn_emu

using xpcnn_emu::CArray;
using xpcnn_emu::CIndexer;

#define threadIdx (xpcnn_emu::thread_index)
#define blockIdx (xpcnn_emu::block_index)
#define blockDim (xpcnn_emu::block_dim)
#define gridDim (xpcnn_emu::grid_dim)

inline void __syncthreads() { xpcnn_emu::barrier(); }

// CuPy's grid-stride loop, with a 64-bit index.
#define CUPY_FOR(i, n)                                                                          \
    for (ptrdiff_t i = static_cast<ptrdiff_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
         i += static_cast<ptrdiff_t>(blockDim.x) * gridDim.x)
