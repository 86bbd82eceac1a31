// The driver's own floor for one kernel launch, measured in C without unibuf or cudarc: is the
// 3–4.6 µs bare cuLaunchKernel that `unibuf bench launch` measures on the lent hosts the driver's
// cost, or something of how the Rust side sets things up (stream flags, context flags, API)?
//
// Host time per launch of an empty kernel, in bursts of 128 launches with the stream
// synchronized between bursts outside the timed part (as `unibuf bench launch`), median of 7
// samples of 20,480 launches, for: the driver API on a non-blocking stream (unibuf's setup), on
// a blocking stream, on the legacy default stream and on the per-thread stream; kernels with no
// parameters and with two; cuLaunchKernelEx; the runtime API's <<<>>>; and the primary context
// with spin scheduling instead of the default. Prints the CPU model last (launch cost is CPU
// time in the driver).
// Standalone: nvcc -O3 -std=c++17 bench/tune/launch_floor.cu -lcuda -o /tmp/launchfloor
#include "driver.h"
#include <cuda_runtime.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <string>
#include <vector>


extern "C" __global__ void noop2(unsigned int* out, unsigned int n) {
    if (n != 0u && threadIdx.x == 0u) out[0] = n;
}
extern "C" __global__ void noop0() {}

static double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Median over samples of host seconds per launch, bursts of `burst` with `sync` untimed between.
static double per_launch_us(const std::function<void()>& launch, const std::function<void()>& sync) {
    const int count = 20480, burst = 128, samples = 7;
    std::vector<double> times;
    for (int s = 0; s <= samples; ++s) {
        double spent = 0;
        for (int done = 0; done < count; done += burst) {
            double t = now_s();
            for (int i = 0; i < burst; ++i) launch();
            spent += now_s() - t;
            sync();
        }
        if (s > 0) times.push_back(spent / count * 1e6);
    }
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
}

int main() {
    CK(cuInit(0));
    CUdevice dev;
    CK(cuDeviceGet(&dev, 0));
    char name[128];
    CK(cuDeviceGetName(name, sizeof name, dev));
    for (int round = 0; round < 2; ++round) {
        for (bool spin : {false, true}) {
            // Applies to an active primary context too on current drivers; say if it did not.
            CUresult flags = cuDevicePrimaryCtxSetFlags(dev, spin ? CU_CTX_SCHED_SPIN : CU_CTX_SCHED_AUTO);
            if (flags != CUDA_SUCCESS) printf("(scheduling flags not applied: error %d)\n", (int)flags);
            CUcontext ctx;
            CK(cuDevicePrimaryCtxRetain(&ctx, dev));
            CK(cuCtxSetCurrent(ctx));
            cudaSetDevice(0);
            CUfunction f2, f0;
            // Runtime-registered kernels: the driver handle through the runtime.
            cudaFunction_t rf2, rf0;
            cudaGetFuncBySymbol(&rf2, (const void*)noop2);
            cudaGetFuncBySymbol(&rf0, (const void*)noop0);
            f2 = (CUfunction)rf2;
            f0 = (CUfunction)rf0;
            CUdeviceptr out;
            CK(cuMemAlloc(&out, 4));
            unsigned int n = 0;
            void* params[2] = {&out, &n};
            CUstream nonblocking, blocking;
            CK(cuStreamCreate(&nonblocking, CU_STREAM_NON_BLOCKING));
            CK(cuStreamCreate(&blocking, CU_STREAM_DEFAULT));
            auto drv = [&](CUfunction f, CUstream s, void** p) {
                return per_launch_us([&] { CK(cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 0, s, p, nullptr)); },
                                     [&] { CK(cuStreamSynchronize(s)); });
            };
            printf("%s, %s scheduling, round %d (us per launch, bursts of 128)\n", name,
                   spin ? "spin" : "auto", round + 1);
            printf("  %-52s %6.2f\n", "cuLaunchKernel, 2 params, non-blocking stream", drv(f2, nonblocking, params));
            printf("  %-52s %6.2f\n", "cuLaunchKernel, 0 params, non-blocking stream", drv(f0, nonblocking, nullptr));
            printf("  %-52s %6.2f\n", "cuLaunchKernel, 2 params, blocking stream", drv(f2, blocking, params));
            printf("  %-52s %6.2f\n", "cuLaunchKernel, 2 params, legacy stream", drv(f2, nullptr, params));
            printf("  %-52s %6.2f\n", "cuLaunchKernel, 2 params, per-thread stream",
                   drv(f2, CU_STREAM_PER_THREAD, params));
            CUlaunchConfig cfg = {};
            cfg.gridDimX = cfg.gridDimY = cfg.gridDimZ = 1;
            cfg.blockDimX = 32;
            cfg.blockDimY = cfg.blockDimZ = 1;
            cfg.hStream = nonblocking;
            printf("  %-52s %6.2f\n", "cuLaunchKernelEx, 2 params, non-blocking stream",
                   per_launch_us([&] { CK(cuLaunchKernelEx(&cfg, f2, params, nullptr)); },
                                 [&] { CK(cuStreamSynchronize(nonblocking)); }));
            cudaStream_t rs = (cudaStream_t)nonblocking;
            unsigned int* rout = (unsigned int*)out;
            printf("  %-52s %6.2f\n", "runtime <<<>>>, 2 params, non-blocking stream",
                   per_launch_us([&] { noop2<<<1, 32, 0, rs>>>(rout, 0u); },
                                 [&] { CK(cuStreamSynchronize(nonblocking)); }));
            printf("  %-52s %6.2f\n", "runtime <<<>>>, 0 params, non-blocking stream",
                   per_launch_us([&] { noop0<<<1, 32, 0, rs>>>(); },
                                 [&] { CK(cuStreamSynchronize(nonblocking)); }));
            CK(cuStreamDestroy(nonblocking));
            CK(cuStreamDestroy(blocking));
            CK(cuMemFree(out));
            CK(cuDevicePrimaryCtxRelease(dev));
        }
    }
    std::ifstream cpu("/proc/cpuinfo");
    std::string line;
    while (std::getline(cpu, line))
        if (line.rfind("model name", 0) == 0) { printf("CPU: %s\n", line.c_str() + line.find(':') + 2); break; }
    return 0;
}
