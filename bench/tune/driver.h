// What the standalone tuning harnesses here share: checking driver calls, a host clock, the
// primary context of device 0, and device memory for the virtual-memory API.
#pragma once
#include <cuda.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>

// A failed driver call prints the call and the driver's message and ends the program.
#define CK(x) do { CUresult ck_r = (x); if (ck_r != CUDA_SUCCESS) { const char* ck_s; cuGetErrorString(ck_r, &ck_s); printf("%s: %s\n", #x, ck_s); exit(1); } } while (0)

static double now_us() {
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Initializes the driver, retains device 0's primary context and makes it current.
static CUdevice bind_primary_context() {
    CK(cuInit(0));
    CUdevice dev;
    CK(cuDeviceGet(&dev, 0));
    CUcontext ctx;
    CK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CK(cuCtxSetCurrent(ctx));
    return dev;
}

// Pinned device memory as the allocator's arena creates it: the allocation properties, the
// mapping granule and read-write access for device 0.
struct VmmMemory {
    CUmemAllocationProp prop;
    size_t granule;
    CUmemAccessDesc access;
};

static VmmMemory vmm_device_memory() {
    VmmMemory m = {};
    m.prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    m.prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    m.prop.location.id = 0;
    CK(cuMemGetAllocationGranularity(&m.granule, &m.prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
    m.access.location = m.prop.location;
    m.access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    return m;
}
