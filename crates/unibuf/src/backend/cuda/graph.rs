//! Launch batches as CUDA graphs: a batch's launches are captured once, on a private stream,
//! into a graph that is instantiated and kept by batch id; each submission of the batch is then
//! one `cuGraphLaunch` on the queue's stream, whatever the number of kernels in it.

use super::driver::{check, CuError};
use super::stream::new_stream;
use crate::backend::BatchedLaunch;
use crate::error::Result;
use cudarc::driver::sys;
use parking_lot::Mutex;
use std::collections::HashMap;

/// An instantiated graph.
struct Exec(sys::CUgraphExec);

// SAFETY: graph handles are usable from any thread with the context current.
unsafe impl Send for Exec {}

#[derive(Default)]
struct State {
    execs: HashMap<u64, Exec>,
    /// The stream captures run on, created on first use.
    capture: Option<sys::CUstream>,
}

// SAFETY: as for Exec; the stream handle is only used under the mutex.
unsafe impl Send for State {}

/// The graphs of one backend.
#[derive(Default)]
pub(super) struct Graphs(Mutex<State>);

impl Graphs {
    /// The executable graph of batch `id`, captured from `launches` (each encoded by `launch`
    /// onto the capture stream) on first use.
    pub fn exec(
        &self,
        id: u64,
        launches: &[BatchedLaunch],
        launch: impl Fn(sys::CUstream, &BatchedLaunch) -> Result<()>,
    ) -> Result<sys::CUgraphExec> {
        let mut st = self.0.lock();
        if let Some(e) = st.execs.get(&id) {
            return Ok(e.0);
        }
        let stream = match st.capture {
            Some(s) => s,
            None => {
                let s =
                    new_stream().map_err(|e| e.into_error("creating the graph capture stream"))?;
                st.capture = Some(s);
                s
            }
        };
        // Thread-local capture: only this thread's calls may not interfere, and it makes none
        // but the launches while capturing.
        // SAFETY: a live stream of this context, not capturing (captures are serialised by the
        // mutex held here).
        check(
            unsafe {
                sys::cuStreamBeginCapture_v2(
                    stream,
                    sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                )
            },
            "cuStreamBeginCapture",
        )
        .map_err(|e| e.into_error("capturing a launch batch"))?;
        let recorded = launches.iter().try_for_each(|l| launch(stream, l));
        let mut graph: sys::CUgraph = std::ptr::null_mut();
        // SAFETY: ends the capture begun above; valid out-pointer.
        let ended = check(
            unsafe { sys::cuStreamEndCapture(stream, &mut graph) },
            "cuStreamEndCapture",
        );
        let instantiated = recorded.and_then(|()| {
            ended.map_err(|e| e.into_error("capturing a launch batch"))?;
            let mut exec: sys::CUgraphExec = std::ptr::null_mut();
            // SAFETY: a complete graph from the capture; valid out-pointer.
            check(
                unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) },
                "cuGraphInstantiateWithFlags",
            )
            .map_err(|e| e.into_error("instantiating a launch batch"))?;
            Ok(exec)
        });
        if !graph.is_null() {
            // SAFETY: the graph is ours; an instantiated graph does not need it.
            unsafe { sys::cuGraphDestroy(graph) };
        }
        let exec = instantiated?;
        st.execs.insert(id, Exec(exec));
        Ok(exec)
    }

    /// Destroys batch `id`'s graph. Launches of it still in flight complete first (the driver
    /// frees an executable graph that is running once it finishes).
    pub fn forget(&self, id: u64) -> Result<(), CuError> {
        let removed = self.0.lock().execs.remove(&id);
        if let Some(e) = removed {
            // SAFETY: instantiated by `exec`, destroyed once (it left the map).
            check(
                unsafe { sys::cuGraphExecDestroy(e.0) },
                "cuGraphExecDestroy",
            )?;
        }
        Ok(())
    }
}

impl Drop for Graphs {
    fn drop(&mut self) {
        let st = std::mem::take(self.0.get_mut());
        for (_, e) in st.execs {
            // SAFETY: instantiated by `exec`; the backend synchronised its streams.
            unsafe { sys::cuGraphExecDestroy(e.0) };
        }
        if let Some(s) = st.capture {
            // SAFETY: created by `exec`, idle (captures end before the mutex is released).
            unsafe { sys::cuStreamDestroy_v2(s) };
        }
    }
}
