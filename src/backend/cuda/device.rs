//! The GPU as the CUDA backend sees it: finding a usable device without panicking when the
//! driver or libraries are absent, one context and stream, plain device allocations with an
//! out-of-memory error that says how much was asked and how much is free, and copies.
//!
//! Buffers are raw device pointers owned by [`DevBuf`] (freed on drop). Kernels take them as
//! plain `u64` arguments, which keeps launches free of cudarc's per-buffer event tracking and
//! lets a whole decode step be captured into a CUDA graph.

use std::sync::Arc;

use cudarc::driver::PushKernelArg;
use cudarc::driver::{result as drv, sys, CudaContext, CudaFunction, CudaStream, LaunchConfig};

use crate::backend::BackendError;

/// Why no GPU can be used; printed when `--device auto` falls back to the CPU.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CudaUnavailable {
    #[error("the CUDA driver library (libcuda) was not found")]
    NoDriver,
    #[error(
        "the NVRTC library (libnvrtc.so.13) was not found; it is needed to compile the kernels"
    )]
    NoNvrtc,
    #[error("the cuBLAS library (libcublas.so.13) was not found")]
    NoCublas,
    #[error("no CUDA device: {0}")]
    NoDevice(String),
}

/// Checks the libraries and the device count without touching anything that panics.
pub fn probe() -> Result<(), CudaUnavailable> {
    // SAFETY: these only try to dlopen the libraries.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            return Err(CudaUnavailable::NoDriver);
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            return Err(CudaUnavailable::NoNvrtc);
        }
        if !cudarc::cublas::sys::is_culib_present() {
            return Err(CudaUnavailable::NoCublas);
        }
    }
    drv::init().map_err(|e| CudaUnavailable::NoDevice(format!("cuInit failed: {e}")))?;
    match drv::device::get_count() {
        Ok(0) => Err(CudaUnavailable::NoDevice(
            "the driver reports 0 devices".into(),
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(CudaUnavailable::NoDevice(e.to_string())),
    }
}

/// Whether the NVRTC library can be loaded (all that compiling kernels needs).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

pub fn driver_err(what: &str, e: impl std::fmt::Display) -> BackendError {
    BackendError::Device(format!("{what}: {e}"))
}

/// A kernel argument: a device pointer or size, an int, a float.
pub enum A {
    P(u64),
    I(i32),
    F(f32),
}

/// Launch shape: `grid` blocks of `block` threads, no dynamic shared memory.
pub fn lcfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Blocks of `per` threads covering `n` items (at least one).
pub fn blocks(n: usize, per: usize) -> u32 {
    n.div_ceil(per).max(1) as u32
}

/// One thread per item, 256 per block.
pub fn cfg_1d(n: usize) -> LaunchConfig {
    lcfg((blocks(n, 256), 1, 1), 256)
}

/// One device: context, stream, name and compute capability.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub name: String,
    pub cc: (i32, i32),
    /// Streaming multiprocessors (sizes the launches that must fill the device).
    pub sms: usize,
    /// Whether [`Gpu::launch_pdl`] launches programmatically dependent kernels (sm_90 and
    /// later, unless `MOA_PDL=0`).
    pub pdl: bool,
}

impl Gpu {
    pub fn open(ordinal: usize) -> Result<Gpu, BackendError> {
        probe().map_err(|e| BackendError::Device(e.to_string()))?;
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("creating the context", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_err("creating a stream", e))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let cc = ctx
            .compute_capability()
            .map_err(|e| driver_err("reading the compute capability", e))?;
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .unwrap_or(132)
            .max(1) as usize;
        let pdl = cc.0 >= 9 && std::env::var("MOA_PDL").map_or(true, |v| v != "0");
        Ok(Gpu {
            ctx,
            stream,
            name,
            cc,
            sms,
            pdl,
        })
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> (usize, usize) {
        self.ctx.mem_get_info().unwrap_or((0, 0))
    }

    /// A device buffer of `bytes` (at least 1), zero-filled.
    pub fn alloc(&self, bytes: usize, what: &str) -> Result<DevBuf, BackendError> {
        let n = bytes.max(1);
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_err("binding the context", e))?;
        // SAFETY: plain cuMemAlloc; the pointer is owned by the returned DevBuf.
        let ptr = unsafe { drv::malloc_sync(n) }.map_err(|e| {
            let (free, total) = self.mem_info();
            if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                BackendError::DeviceOutOfMemory {
                    what: what.into(),
                    bytes: n,
                    free,
                    total,
                }
            } else {
                driver_err(&format!("allocating {n} bytes for {what}"), e)
            }
        })?;
        // On our stream, so it is ordered before every later copy and kernel: cuMemsetD8 (the
        // "sync" variant) runs on the legacy default stream, which a non-blocking stream does not
        // wait for, so a late clear could overwrite data uploaded or computed after it.
        // SAFETY: ptr is a fresh allocation of n bytes.
        unsafe { drv::memset_d8_async(ptr, 0, n, self.stream.cu_stream()) }
            .map_err(|e| driver_err("clearing memory", e))?;
        Ok(DevBuf { ptr, bytes: n })
    }

    /// Copies `src` to the start of `dst` (synchronous with respect to the host buffer).
    pub fn upload<T>(&self, dst: &DevBuf, src: &[T]) -> Result<(), BackendError> {
        let n = std::mem::size_of_val(src);
        assert!(n <= dst.bytes, "upload of {n} bytes into {}", dst.bytes);
        if n == 0 {
            return Ok(());
        }
        // SAFETY: dst holds at least n bytes; the copy is ordered on our stream and completes
        // before returning for pageable host memory.
        unsafe { drv::memcpy_htod_async(dst.ptr, src, self.stream.cu_stream()) }
            .map_err(|e| driver_err("copying to the device", e))
    }

    /// Copies the start of `src` into `dst` and waits for the stream.
    pub fn download<T>(&self, dst: &mut [T], src: &DevBuf) -> Result<(), BackendError> {
        let n = std::mem::size_of_val(dst);
        assert!(n <= src.bytes);
        if n > 0 {
            // SAFETY: src holds at least n bytes.
            unsafe { drv::memcpy_dtoh_async(dst, src.ptr, self.stream.cu_stream()) }
                .map_err(|e| driver_err("copying from the device", e))?;
        }
        self.sync()
    }

    /// Launches `f` on the stream.
    pub fn launch(
        &self,
        f: &CudaFunction,
        c: LaunchConfig,
        args: &[A],
    ) -> Result<(), BackendError> {
        self.timed(f, || {
            let mut b = self.stream.launch_builder(f);
            for a in args {
                match a {
                    A::P(v) => b.arg(v),
                    A::I(v) => b.arg(v),
                    A::F(v) => b.arg(v),
                };
            }
            // SAFETY: callers pass argument lists that match the kernels' signatures in
            // cuda/*.cu, with pointers to live allocations of the sizes the kernels index.
            unsafe { b.launch(c) }
                .map(|_| ())
                .map_err(|e| driver_err("launching a kernel", e))
        })
    }

    /// Runs `launch` (one launch of `f`) between the kernel timer's events when it is on.
    fn timed(
        &self,
        f: &CudaFunction,
        launch: impl FnOnce() -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        if super::timer::skipped(f) {
            return Ok(());
        }
        let timed = super::timer::enabled().then(|| super::timer::start(&self.stream));
        launch()?;
        if let Some(Some(start)) = timed {
            super::timer::stop(&self.stream, f, start);
        }
        Ok(())
    }

    /// Launches `f` as a programmatic dependent of the kernel before it on the stream (when
    /// [`Gpu::pdl`]; else as [`Gpu::launch`]): it may start once every block of that kernel
    /// has called `pdl_trigger()`, and must call `pdl_wait()` before reading anything but
    /// constant data (common.cuh). The decode products use it to have their weights in flight
    /// while the norm or quantization before them finishes.
    pub fn launch_pdl(
        &self,
        f: &CudaFunction,
        c: LaunchConfig,
        args: &[A],
    ) -> Result<(), BackendError> {
        if !self.pdl {
            return self.launch(f, c, args);
        }
        // Each argument in its own 8-byte slot; the driver reads as many bytes as the kernel's
        // parameter takes (little-endian, so a 4-byte value sits at the slot's start).
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                A::P(v) => v,
                A::I(v) => v as u32 as u64,
                A::F(v) => v.to_bits() as u64,
            })
            .collect();
        let mut params: Vec<*mut std::ffi::c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut std::ffi::c_void)
            .collect();
        // SAFETY: a zeroed attribute is valid plain data; id and value are set below.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let cfg = sys::CUlaunchConfig {
            gridDimX: c.grid_dim.0,
            gridDimY: c.grid_dim.1,
            gridDimZ: c.grid_dim.2,
            blockDimX: c.block_dim.0,
            blockDimY: c.block_dim.1,
            blockDimZ: c.block_dim.2,
            sharedMemBytes: c.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        self.timed(f, || {
            self.ctx
                .bind_to_thread()
                .map_err(|e| driver_err("binding the context", e))?;
            // SAFETY: `params` points at one slot per kernel parameter, in order, matching the
            // kernel's signature (the callers' argument lists are those of `launch`); the slots
            // outlive the call, which copies them.
            unsafe {
                sys::cuLaunchKernelEx(
                    &cfg,
                    f.cu_function(),
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            }
            .result()
            .map_err(|e| driver_err("launching a kernel", e))
        })
    }

    pub fn sync(&self) -> Result<(), BackendError> {
        self.stream
            .synchronize()
            .map_err(|e| driver_err("running the kernels", e))
    }
}

/// A device allocation, freed on drop.
pub struct DevBuf {
    pub ptr: u64,
    pub bytes: usize,
}

impl DevBuf {
    /// Device address `off` bytes in.
    pub fn at(&self, off: usize) -> u64 {
        debug_assert!(off <= self.bytes);
        self.ptr + off as u64
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // SAFETY: ptr came from cuMemAlloc and is freed once.
        unsafe {
            let _ = drv::free_sync(self.ptr);
        }
    }
}

/// Host memory for device-to-host copies: page-locked when the driver grants it (the copy is
/// then one DMA, without the driver's staging through a bounce buffer), else ordinary memory.
pub struct HostBuf {
    ptr: *mut f32,
    len: usize,
    pinned: bool,
    /// Owns the storage `ptr` points into when pinning failed.
    _fallback: Vec<f32>,
}

// SAFETY: the buffer is owned exclusively (like a Vec); the driver only touches it during the
// copies this struct's owner issues and waits for.
unsafe impl Send for HostBuf {}
unsafe impl Sync for HostBuf {}

impl HostBuf {
    pub fn new(len: usize) -> HostBuf {
        let bytes = (len * 4).max(4);
        // SAFETY: plain cuMemHostAlloc (the context is current: allocations before bound it);
        // the memory is zeroed before use and freed once in drop.
        match unsafe { drv::malloc_host(bytes, 0) } {
            Ok(p) => {
                let ptr = p as *mut f32;
                // SAFETY: p holds `bytes` bytes.
                unsafe { std::ptr::write_bytes(ptr, 0, len) };
                HostBuf {
                    ptr,
                    len,
                    pinned: true,
                    _fallback: Vec::new(),
                }
            }
            Err(_) => {
                let mut fallback = vec![0f32; len];
                HostBuf {
                    ptr: fallback.as_mut_ptr(),
                    len,
                    pinned: false,
                    _fallback: fallback,
                }
            }
        }
    }
}

impl std::ops::Deref for HostBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: ptr holds len initialized f32s (pinned or the fallback Vec's storage).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for HostBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in deref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        if self.pinned {
            // SAFETY: ptr came from cuMemHostAlloc and is freed once.
            unsafe {
                let _ = drv::free_host(self.ptr as *mut std::ffi::c_void);
            }
        }
    }
}
