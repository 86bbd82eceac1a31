//! Kernel compilation: NVRTC to a CUBIN for the device's compute capability, cached on disk.
//!
//! The cache key covers the source, the options (constants become `-D` defines), the compute
//! capability and the NVRTC version, so that a second process start loads the CUBIN and compiles
//! nothing, and any change that could alter the binary misses the cache.

use crate::error::{Error, Result};
use crate::kernel::Constants;
use cudarc::nvrtc::sys as nvrtc;
use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// How many kernels were compiled and how many came from the disk cache.
#[derive(Default)]
pub(super) struct CompileCounters {
    pub compiled: AtomicU64,
    pub disk_hits: AtomicU64,
}

/// The directory of the kernel cache: `UNIBUF_CACHE_DIR`, else `$XDG_CACHE_HOME/unibuf`, else
/// `~/.cache/unibuf`; `kernels/` inside it.
pub(super) fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("UNIBUF_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|p| PathBuf::from(p).join("unibuf")))
        .or_else(|| {
            std::env::var_os("HOME").map(|p| PathBuf::from(p).join(".cache").join("unibuf"))
        })?;
    Some(base.join("kernels"))
}

/// FNV-1a, 64-bit. Written here because the key must be stable across Rust releases and
/// processes (std's hasher promises neither) and it is a few lines.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain(&[0xFF]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn nvrtc_version() -> (i32, i32) {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: valid out-pointers.
    unsafe { nvrtc::nvrtcVersion(&mut major, &mut minor) };
    (major, minor)
}

fn options(constants: &Constants, cc: (i32, i32)) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture=sm_{}{}", cc.0, cc.1),
        "--std=c++17".to_owned(),
        "-lineinfo".to_owned(),
    ];
    o.extend(constants.iter().map(|(n, v)| format!("-D{n}={v}")));
    o
}

/// The CUBIN for `source` (entry `name`), from the disk cache or freshly compiled.
pub(super) fn cubin(
    name: &str,
    source: &str,
    constants: &Constants,
    cc: (i32, i32),
    dir: Option<&Path>,
    counters: &CompileCounters,
) -> Result<Vec<u8>> {
    // Before asking NVRTC its version: cudarc's dynamic loading panics when the library is
    // absent, and this is reached from submissions (the backend's copy and fill kernels).
    // SAFETY: no preconditions; it only probes for the library.
    if !unsafe { nvrtc::is_culib_present() } {
        return Err(Error::Compile {
            kernel: name.to_owned(),
            log: "libnvrtc was not found (add the CUDA lib64 directory to LD_LIBRARY_PATH)"
                .to_owned(),
        });
    }
    let opts = options(constants, cc);
    let (vmaj, vmin) = nvrtc_version();
    let version = format!("nvrtc {vmaj}.{vmin}");
    let joined = opts.join(" ");
    let key = fnv1a(&[source.as_bytes(), joined.as_bytes(), version.as_bytes()]);
    let path = dir.map(|d| d.join(format!("{name}-sm{}{}-{key:016x}.cubin", cc.0, cc.1)));
    if let Some(bytes) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        counters.disk_hits.fetch_add(1, Ordering::Relaxed);
        return Ok(bytes);
    }
    let bytes = compile(name, source, &opts)?;
    counters.compiled.fetch_add(1, Ordering::Relaxed);
    if let (Some(dir), Some(path)) = (dir, &path) {
        // A cache that cannot be written only costs a compile next time; not an error.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::create_dir_all(dir).is_ok() && std::fs::write(&tmp, &bytes).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
    Ok(bytes)
}

fn compile(name: &str, source: &str, opts: &[String]) -> Result<Vec<u8>> {
    let fail = |log: String| Error::Compile {
        kernel: name.to_owned(),
        log,
    };
    // SAFETY: no preconditions; it only probes for the library.
    if !unsafe { nvrtc::is_culib_present() } {
        return Err(fail(
            "libnvrtc was not found (add the CUDA lib64 directory to LD_LIBRARY_PATH)".to_owned(),
        ));
    }
    let src =
        CString::new(source).map_err(|_| fail("the source contains a NUL byte".to_owned()))?;
    let cname = CString::new(format!("{name}.cu"))
        .map_err(|_| fail("the name contains a NUL byte".to_owned()))?;
    let copts: Vec<CString> = opts
        .iter()
        .map(|o| CString::new(o.as_str()).expect("options have no NUL"))
        .collect();
    let ptrs: Vec<*const c_char> = copts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: nvrtc::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: valid NUL-terminated strings that outlive the call; no headers.
    let r = unsafe {
        nvrtc::nvrtcCreateProgram(
            &mut prog,
            src.as_ptr(),
            cname.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if r != nvrtc::nvrtcResult::NVRTC_SUCCESS {
        return Err(fail(format!("nvrtcCreateProgram: {r:?}")));
    }
    // SAFETY: `prog` was created above; `ptrs` point into `copts`, alive for the call.
    let compiled = unsafe { nvrtc::nvrtcCompileProgram(prog, ptrs.len() as i32, ptrs.as_ptr()) };
    let result = if compiled == nvrtc::nvrtcResult::NVRTC_SUCCESS {
        let mut size = 0usize;
        // SAFETY: a successfully compiled program; valid out-pointer.
        unsafe { nvrtc::nvrtcGetCUBINSize(prog, &mut size) };
        let mut bin = vec![0u8; size];
        // SAFETY: `bin` holds `size` bytes as the call requires.
        let r = unsafe { nvrtc::nvrtcGetCUBIN(prog, bin.as_mut_ptr().cast()) };
        if r == nvrtc::nvrtcResult::NVRTC_SUCCESS && size > 0 {
            Ok(bin)
        } else {
            Err(fail(format!("nvrtcGetCUBIN: {r:?}")))
        }
    } else {
        Err(fail(program_log(prog)))
    };
    // SAFETY: created above, destroyed once.
    unsafe { nvrtc::nvrtcDestroyProgram(&mut prog) };
    result
}

fn program_log(prog: nvrtc::nvrtcProgram) -> String {
    let mut size = 0usize;
    // SAFETY: a live program; valid out-pointer.
    unsafe { nvrtc::nvrtcGetProgramLogSize(prog, &mut size) };
    let mut log = vec![0u8; size.max(1)];
    // SAFETY: `log` holds `size` bytes.
    unsafe { nvrtc::nvrtcGetProgramLog(prog, log.as_mut_ptr().cast()) };
    String::from_utf8_lossy(&log)
        .trim_end_matches('\0')
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_depend_on_everything_that_changes_the_binary() {
        let a = fnv1a(&[b"src", b"-DX=1", b"nvrtc 13.0"]);
        assert_ne!(a, fnv1a(&[b"src", b"-DX=2", b"nvrtc 13.0"]));
        assert_ne!(a, fnv1a(&[b"src", b"-DX=1", b"nvrtc 13.1"]));
        assert_ne!(
            fnv1a(&[b"ab", b"c"]),
            fnv1a(&[b"a", b"bc"]),
            "parts are delimited"
        );
        assert_eq!(a, fnv1a(&[b"src", b"-DX=1", b"nvrtc 13.0"]));
        let o = options(&Constants::new().with("BLOCK", 256), (9, 0));
        assert_eq!(o[0], "--gpu-architecture=sm_90");
        assert!(o.contains(&"-DBLOCK=256".to_owned()));
    }
}
