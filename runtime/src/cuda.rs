//! The CUDA backend: weights, KV cache and activations on the GPU; each forward is ONE cooperative launch of the
//! plan's persistent megakernel. CUDA is reached through cudarc with dynamic loading, so this compiles (and the
//! CPU backend runs) on machines without CUDA; `CudaSession::new` fails cleanly there.

use crate::generate::Backend;
use crate::model::Model;
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
    LaunchConfig, PushKernelArg,
};
use mimo_kernels::device::{encode, threads, DInstr, Encoded};
use std::path::Path;
use std::sync::Arc;

/// Kernel parameters; matches `struct Params` in kernels/cuda/megakernel.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Params {
    instrs: u64,
    ninstr: i32,
    _pad0: i32,
    weights: u64,
    arena: u64,
    kv: u64,
    scratch: u64,
    tokens: u64,
    pos: u64,
    out_tokens: u64,
    done: u64,
    epoch: u32,
    t: i32,
    temperature: f32,
    _pad1: i32,
    seed: u64,
    prof: u64,
    tmaps: u64,
    tmok: u64,
    tiled: u64,
    tinfo: u64,
}
// SAFETY: plain-old-data, passed by value as the kernel's single parameter.
unsafe impl DeviceRepr for Params {}

/// Encode the ring's TMA tensor maps (see `mimo_kernels::tmap`) for every instruction over the weights at `base`:
/// the maps (128 bytes each, `MAPS_PER_INSTR` per instruction) and per instruction the bits of those the driver
/// accepted. A map the driver rejects is left out (the kernel copies those rows one by one), with one warning.
fn encode_tensor_maps(instrs: &[DInstr], base: u64) -> (Vec<u8>, Vec<u32>) {
    use cudarc::driver::sys::{
        cuTensorMapEncodeTiled, CUresult, CUtensorMap, CUtensorMapDataType,
        CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion, CUtensorMapSwizzle,
    };
    use mimo_kernels::tmap::{self, Swizzle, MAPS_PER_INSTR, MAP_BYTES};
    let mut bytes = vec![0u8; instrs.len() * MAPS_PER_INSTR * MAP_BYTES];
    let mut ok = vec![0u32; instrs.len()];
    let mut warned = false;
    for (i, d) in instrs.iter().enumerate() {
        let mut got = [false; MAPS_PER_INSTR];
        for (j, spec) in tmap::instr_maps(d).iter().enumerate() {
            let Some(m) = spec else { continue };
            let mut map = CUtensorMap { opaque: [0; 16] };
            let estr = [1u32; 3];
            let swizzle = match m.swizzle {
                Swizzle::B128 => CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                Swizzle::B64 => CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B,
            };
            // SAFETY: the arrays hold `rank` entries (strides rank - 1); the address is inside the weights
            // buffer; the driver only writes the 128-byte map.
            let r = unsafe {
                cuTensorMapEncodeTiled(
                    &mut map,
                    CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
                    m.rank,
                    (base + m.offset) as *mut std::ffi::c_void,
                    m.dims.as_ptr(),
                    m.strides.as_ptr(),
                    m.boxdim.as_ptr(),
                    estr.as_ptr(),
                    CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                    swizzle,
                    CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                    CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
                )
            };
            if r == CUresult::CUDA_SUCCESS {
                got[j] = true;
                let at = (i * MAPS_PER_INSTR + j) * MAP_BYTES;
                for (q, w) in map.opaque.iter().enumerate() {
                    bytes[at + 8 * q..at + 8 * q + 8].copy_from_slice(&w.to_le_bytes());
                }
            } else if !warned {
                warned = true;
                tracing::warn!(
                    "tensor map {j} of instruction {i} rejected by the driver ({r:?}); those rows stream by row copies"
                );
            }
        }
        ok[i] = tmap::flags(&got);
    }
    // Never an empty upload (a program always has instructions, but keep the buffers allocatable regardless).
    bytes.resize(bytes.len().max(MAP_BYTES), 0);
    ok.resize(ok.len().max(1), 0);
    (bytes, ok)
}

/// Is a CUDA driver with at least one device present?
pub fn cuda_available() -> bool {
    // SAFETY: only probes whether the driver library can be opened.
    let present = unsafe { cudarc::driver::sys::is_culib_present() };
    present && CudaContext::new(0).is_ok()
}

/// The megakernel's entry points: `mimo_forward`; when the build has them its MXFP4 load transform
/// (`mimo_fp4_repack`: kernels built without it read MXFP4 weights in the plan's OCP layout) and its weight tiler
/// (`mimo_tile`: older builds stream every ring chunk by row copies); and whether it reads TMA tensor maps (builds
/// with `MK_TMAP` carry the `mimo_tmap_marker` entry).
struct Entries {
    forward: CudaFunction,
    repack: Option<CudaFunction>,
    tile: Option<CudaFunction>,
    reads_tmaps: bool,
    /// Streams MXFP4 through the v23 ring (`mimo_v23_marker`): its tiled copy is step-major.
    v23: bool,
}

fn load_function(ctx: &Arc<CudaContext>, plan_dir: &Path) -> Result<Entries> {
    let cubin = plan_dir.join("megakernel.cubin");
    let (module, image) = if cubin.is_file() {
        let image =
            std::fs::read(&cubin).with_context(|| format!("reading {}", cubin.display()))?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_file(cubin.clone()))
            .with_context(|| format!("loading {}", cubin.display()))?;
        (module, image)
    } else {
        let cu = plan_dir.join("megakernel.cu");
        let src =
            std::fs::read_to_string(&cu).with_context(|| format!("reading {}", cu.display()))?;
        let ptx = compile_cached(&src)?;
        let image = ptx.to_src().into_bytes();
        let module = ctx
            .load_module(ptx)
            .context("loading the NVRTC-compiled megakernel")?;
        (module, image)
    };
    let forward = module
        .load_function("mimo_forward")
        .context("megakernel entry point mimo_forward")?;
    // Optional entry points are looked up only when the image names them: a failed lookup is a driver error
    // that compute-sanitizer reports (memcheck's error count would not be 0 on a clean run).
    let optional = |name: &str| {
        if image_names_entry(&image, name) {
            module.load_function(name).ok()
        } else {
            None
        }
    };
    Ok(Entries {
        forward,
        repack: optional("mimo_fp4_repack"),
        tile: optional("mimo_tile"),
        reads_tmaps: optional("mimo_tmap_marker").is_some(),
        v23: optional("mimo_v23_marker").is_some(),
    })
}

/// The v18 pre-tiled copy of the ring-streamed FP8 / MXFP4 matrices (`mimo_kernels::tiled`): the tiled buffer and
/// the per-instruction `tinfo` triples the kernel reads. None when the plan has nothing to tile or the device has
/// no room for the copy beside everything else the session holds and a reserve (a warning; the kernel then copies
/// every ring chunk row by row). Called after every other allocation, so the copy never takes the KV cache's room.
fn tile_weights(
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    tile: &CudaFunction,
    plan: &mimo_ir::plan::Plan,
    instrs: &[DInstr],
    weights: &CudaSlice<u8>,
    v23: bool,
) -> Result<Option<(CudaSlice<u8>, CudaSlice<i64>)>> {
    let tp = mimo_kernels::tiled::tile_plan_for(&plan.weights, instrs, v23);
    if tp.jobs.is_empty() {
        return Ok(None);
    }
    ctx.bind_to_thread()?;
    let (free, total) = cudarc::driver::result::mem_get_info()?;
    // Leave 1 GiB or 5 % of the device (whichever is larger) for the driver, workspaces and other sessions.
    let reserve = (1u64 << 30).max(total as u64 / 20);
    if (free as u64) < tp.bytes + reserve {
        tracing::warn!(
            "{:.2} GB free on the device, the tiled weight copy needs {:.2} GB and a {:.2} GB reserve: ring chunks \
             stream row by row",
            free as f64 / 1e9,
            tp.bytes as f64 / 1e9,
            reserve as f64 / 1e9
        );
        return Ok(None);
    }
    let mut buf = match stream.alloc_zeros::<u8>(tp.bytes as usize) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(
                "no device memory for the {:.2} GB tiled weight copy ({e:?}): ring chunks stream row by row",
                tp.bytes as f64 / 1e9
            );
            return Ok(None);
        }
    };
    for j in &tp.jobs {
        let units = j.bytes() / if j.pitch % 16 == 0 { 16 } else { 1 };
        let (src, _g) = weights.device_ptr(stream);
        let (dst, _d) = buf.device_ptr_mut(stream);
        let (src, dst) = (src + j.src, dst + j.dst);
        let (rows, nb) = (j.rows as i64, j.nb as i64);
        let (rb, seg, pitch, nsg) = (j.rb as i32, j.seg as i32, j.pitch, j.nsg as i32);
        let cfg = grid_stride(units, 8192);
        let mut b = stream.launch_builder(tile);
        b.arg(&src)
            .arg(&dst)
            .arg(&rows)
            .arg(&rb)
            .arg(&seg)
            .arg(&pitch)
            .arg(&nsg)
            .arg(&nb);
        // SAFETY: src is a weight (or its scales) the plan loader checked against the weight blob, rows x rb bytes;
        // dst + j.bytes() lies inside `buf`, which tile_plan sized to hold every job.
        unsafe { b.launch(cfg) }.with_context(|| format!("tiling weight {}", j.name))?;
    }
    Ok(Some((buf, stream.memcpy_stod(&tp.tinfo)?)))
}

/// Whether a module image (a cubin's ELF string table, or PTX text) names entry point `name`: the name as a
/// whole identifier, not the tail or head of a longer one.
fn image_names_entry(image: &[u8], name: &str) -> bool {
    let n = name.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$';
    image.windows(n.len()).enumerate().any(|(i, w)| {
        w == n
            && (i == 0 || !ident(image[i - 1]))
            && image.get(i + n.len()).is_none_or(|&b| !ident(b))
    })
}

/// A load-time kernel's launch: 256-thread blocks over `units` work items (grid-stride loops), at most
/// `max_blocks` blocks and at least one.
fn grid_stride(units: u64, max_blocks: u64) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (units.div_ceil(256).clamp(1, max_blocks) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Rewrite every MXFP4 weight of the plan on the device into the megakernel's decode layout (see
/// `mimo_fp4_repack` in kernels/cuda/megakernel.cu). Fails, naming the weight, on a region the kernel cannot
/// take (not whole 32-bit words) or on E8M0 scales above 2^113, which the device decode does not represent.
fn repack_fp4(
    stream: &Arc<CudaStream>,
    repack: &CudaFunction,
    plan: &mimo_ir::plan::Plan,
    weights: &mut CudaSlice<u8>,
) -> Result<()> {
    let mut bad = stream.alloc_zeros::<u32>(plan.weights.len().max(1))?;
    for (i, w) in plan.weights.iter().enumerate() {
        if w.dtype != mimo_ir::DType::MXFP4 || w.nbytes == 0 {
            continue;
        }
        if w.offset % 4 != 0 || w.nbytes % 4 != 0 {
            bail!(
                "MXFP4 weight {} is not in whole 32-bit words (offset {}, {} bytes)",
                w.name,
                w.offset,
                w.nbytes
            );
        }
        let nwords = w.nbytes / 4;
        let (base, _g) = weights.device_ptr_mut(stream);
        let (flags, _f) = bad.device_ptr_mut(stream);
        let (data, scales) = (base + w.offset, base + w.scale_offset);
        let flag = flags + 4 * i as u64;
        let cfg = grid_stride(nwords, 4096);
        let mut b = stream.launch_builder(repack);
        b.arg(&data)
            .arg(&nwords)
            .arg(&scales)
            .arg(&w.scale_nbytes)
            .arg(&flag);
        // SAFETY: data / scales lie inside the weight buffer (the plan loader checked every descriptor against
        // the weight blob), nwords whole words from a 4-byte-aligned offset; flag is element i of `bad`.
        unsafe { b.launch(cfg) }.with_context(|| format!("repacking MXFP4 weight {}", w.name))?;
    }
    let flags = stream.memcpy_dtov(&bad)?;
    if let Some(i) = flags.iter().position(|&f| f != 0) {
        bail!(
            "MXFP4 weight {} has E8M0 scales above 2^113, which the CUDA megakernel does not represent",
            plan.weights[i].name
        );
    }
    Ok(())
}

/// NVRTC compile, cached by content hash under $XDG_CACHE_HOME/mimo (or ~/.cache/mimo).
fn compile_cached(src: &str) -> Result<cudarc::nvrtc::Ptx> {
    let hash = xxhash_rust::xxh3::xxh3_64(src.as_bytes());
    let dir = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("mimo");
    let path = dir.join(format!("megakernel-{hash:016x}.ptx"));
    if let Ok(p) = std::fs::read_to_string(&path) {
        return Ok(cudarc::nvrtc::Ptx::from_src(p));
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some("sm_90a"),
        options: vec!["-default-device".into(), "--std=c++17".into()],
        ..Default::default()
    };
    let ptx =
        cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| anyhow!("NVRTC: {e:?}"))?;
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(&path, ptx.to_src());
    Ok(ptx)
}

pub struct CudaSession {
    pub model: Arc<Model>,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    func: CudaFunction,
    weights: CudaSlice<u8>,
    instrs: CudaSlice<u8>,
    ninstr: usize,
    /// TMA tensor maps of the ring-streamed weights and their per-instruction validity bits (`encode_tensor_maps`);
    /// None for a kernel built without them (the kernel then sees null pointers).
    tmaps: Option<(CudaSlice<u8>, CudaSlice<u32>)>,
    /// The pre-tiled weight copy and its per-instruction offsets (`tile_weights`); None: row copies only.
    tiled: Option<(CudaSlice<u8>, CudaSlice<i64>)>,
    arena: CudaSlice<f32>,
    kv: CudaSlice<f32>,
    scratch: CudaSlice<f32>,
    tokens: CudaSlice<i32>,
    pos: CudaSlice<i32>,
    out_tokens: CudaSlice<i32>,
    done: CudaSlice<u32>,
    epoch: u32,
    grid: u32,
    enc: Encoded,
    max_ctx: usize,
    /// Copy logits back after each forward (off for argmax-only benchmarking).
    pub read_logits: bool,
    logits: Vec<f32>,
    t: usize,
    /// Temperature / seed of the in-kernel Gumbel-max sampler (0 = argmax).
    pub temperature: f32,
    pub seed: u64,
    /// Per (instruction, block) timestamps of the last forward when profiling is on.
    prof: Option<CudaSlice<u64>>,
}

/// One instruction's timing in a profiled forward: per block, when it started waiting for its producers, when it
/// started work and when it published completion (ns, the GPU's global timer).
#[derive(Clone, Debug)]
pub struct InstrProfile {
    pub op: i32,
    /// [block] = (wait start, work start, end, cumulative ns consumer warp 0 has spent in the weight ring)
    pub blocks: Vec<(u64, u64, u64, u64)>,
}

/// One profiled forward: per-instruction timings, and the weight-ring counters summed over blocks (SM cycles):
/// consumer warp 0 waiting for full slots, consumer warp 0 inside the ring, the producer waiting for free slots,
/// the producer inside the ring.
#[derive(Clone, Debug)]
pub struct ForwardProfile {
    pub instrs: Vec<InstrProfile>,
    pub ring: [u64; 4],
}

impl CudaSession {
    pub fn new(
        model: Arc<Model>,
        plan_dir: &Path,
        max_ctx: usize,
        device: usize,
    ) -> Result<CudaSession> {
        // SAFETY: only probes whether the driver library can be opened.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            bail!("the CUDA driver library (libcuda.so) is not present: no GPU on this machine; use --device cpu");
        }
        let ctx = CudaContext::new(device).map_err(|e| anyhow!("CUDA device {device}: {e:?}"))?;
        let stream = ctx.default_stream();
        let Entries {
            forward: func,
            repack,
            tile,
            reads_tmaps,
            v23,
        } = load_function(&ctx, plan_dir)?;
        // The kernel's block size (its __launch_bounds__) must be the one this process encodes for.
        let kthreads = func
            .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)
            .context("querying the megakernel's block size")? as usize;
        if kthreads != threads() {
            bail!(
                "the plan's megakernel was built for {kthreads} threads per block but this process encodes for {}: \
                 run with MIMO_THREADS={kthreads} (the value the plan was compiled with)",
                threads()
            );
        }
        let plan = &model.plan;
        let prog = plan
            .program("target")
            .ok_or_else(|| anyhow!("plan has no target program"))?;
        let enc = encode(plan, prog, max_ctx, true)
            .map_err(|e| anyhow!("encoding the plan for the GPU: {e}"))?;
        let sms =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            enc.smem_bytes as i32,
        )
        .context("raising the megakernel's shared-memory limit")?;
        let per_sm = func
            .occupancy_max_active_blocks_per_multiprocessor(threads() as u32, enc.smem_bytes, None)
            .context("occupancy query")?;
        if per_sm < 1 {
            bail!(
                "the megakernel does not fit on one SM ({} bytes shared memory)",
                enc.smem_bytes
            );
        }
        let mut weights = stream
            .memcpy_stod(model.weights_bytes())
            .context("uploading weights")?;
        if let Some(r) = &repack {
            repack_fp4(&stream, r, plan, &mut weights)?;
        }
        let instrs = stream.memcpy_stod(DInstr::as_bytes(&enc.instrs))?;
        // Tensor maps only for a kernel that reads them; MIMO_TMAP=0 (an experiment knob) withholds them, so such
        // a kernel streams every chunk by row copies (an A/B of the copy path inside one build).
        let tmaps = if reads_tmaps && std::env::var_os("MIMO_TMAP").is_none_or(|v| v != "0") {
            let (tm_bytes, tm_ok) = {
                let (base, _g) = weights.device_ptr(&stream);
                encode_tensor_maps(&enc.instrs, base)
            };
            Some((stream.memcpy_stod(&tm_bytes)?, stream.memcpy_stod(&tm_ok)?))
        } else {
            None
        };
        let arena = stream.alloc_zeros::<f32>(plan.arena_len.max(1))?;
        let kv = stream.alloc_zeros::<f32>(enc.kv.total.max(1))?;
        let scratch = stream.alloc_zeros::<f32>(enc.scratch_len)?;
        let mt = plan.max_tokens;
        let tokens = stream.alloc_zeros::<i32>(mt)?;
        let pos = stream.alloc_zeros::<i32>(mt)?;
        let out_tokens = stream.alloc_zeros::<i32>(mt)?;
        let done = stream.alloc_zeros::<u32>(enc.instrs.len())?;
        // Last, after the MXFP4 repack (the tiled copy holds the device layout) and every buffer the session needs.
        // MIMO_TILED=0 (an A/B knob) keeps the row copies.
        let tiled = match &tile {
            Some(t) if std::env::var_os("MIMO_TILED").is_none_or(|v| v != "0") => {
                tile_weights(&ctx, &stream, t, plan, &enc.instrs, &weights, v23)?
            }
            _ => None,
        };
        let ninstr = enc.instrs.len();
        let vocab = plan.model.vocab;
        Ok(CudaSession {
            model: model.clone(),
            ctx,
            stream,
            func,
            weights,
            instrs,
            ninstr,
            tmaps,
            tiled,
            arena,
            kv,
            scratch,
            tokens,
            pos,
            out_tokens,
            done,
            epoch: 0,
            grid: sms,
            enc,
            max_ctx,
            read_logits: true,
            logits: vec![0.0; mt * vocab],
            t: 0,
            temperature: 0.0,
            seed: 0,
            prof: None,
        })
    }

    pub fn num_sms(&self) -> u32 {
        self.grid
    }

    pub fn device_name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "cuda".into())
    }

    /// Launch one forward asynchronously (no copy back).
    pub fn launch(&mut self, toks: &[u32], start: usize) -> Result<()> {
        let plan = &self.model.plan;
        if toks.is_empty() || toks.len() > plan.max_tokens {
            bail!(
                "a forward takes 1..={} tokens, got {}",
                plan.max_tokens,
                toks.len()
            );
        }
        if start + toks.len() > self.max_ctx {
            bail!(
                "context of {} tokens exceeds the KV cache ({} tokens)",
                start + toks.len(),
                self.max_ctx
            );
        }
        if let Some(&bad) = toks.iter().find(|&&t| t as usize >= plan.model.vocab) {
            bail!(
                "token id {bad} is outside the vocabulary ({})",
                plan.model.vocab
            );
        }
        let t: Vec<i32> = toks.iter().map(|&x| x as i32).collect();
        let p: Vec<i32> = (start..start + toks.len()).map(|x| x as i32).collect();
        self.stream
            .memcpy_htod(&t, &mut self.tokens.slice_mut(0..t.len()))?;
        self.stream
            .memcpy_htod(&p, &mut self.pos.slice_mut(0..p.len()))?;
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch.checked_mul(self.grid).is_none() {
            // Counters would wrap: reset them.
            self.stream.memset_zeros(&mut self.done)?;
            self.epoch = 1;
        }
        let s = &self.stream;
        let params = {
            let (instrs, _a) = self.instrs.device_ptr(s);
            let (weights, _b) = self.weights.device_ptr(s);
            let (arena, _c) = self.arena.device_ptr_mut(s);
            let (kv, _d) = self.kv.device_ptr_mut(s);
            let (scratch, _e) = self.scratch.device_ptr_mut(s);
            let (tokens, _f) = self.tokens.device_ptr(s);
            let (pos, _g) = self.pos.device_ptr(s);
            let (out_tokens, _h) = self.out_tokens.device_ptr_mut(s);
            let (done, _i) = self.done.device_ptr_mut(s);
            let (tmaps, tmok) = match self.tmaps.as_ref() {
                Some((m, ok)) => (m.device_ptr(s).0, ok.device_ptr(s).0),
                None => (0, 0),
            };
            let (tiled, tinfo) = match self.tiled.as_ref() {
                Some((t, i)) => (t.device_ptr(s).0, i.device_ptr(s).0),
                None => (0, 0),
            };
            let prof = match self.prof.as_mut() {
                Some(b) => b.device_ptr_mut(s).0,
                None => 0,
            };
            Params {
                instrs,
                ninstr: self.ninstr as i32,
                _pad0: 0,
                weights,
                arena,
                kv,
                scratch,
                tokens,
                pos,
                out_tokens,
                done,
                epoch: self.epoch,
                t: toks.len() as i32,
                temperature: self.temperature,
                _pad1: 0,
                seed: self.seed,
                prof,
                tmaps,
                tmok,
                tiled,
                tinfo,
            }
        };
        let cfg = LaunchConfig {
            grid_dim: (self.grid, 1, 1),
            block_dim: (threads() as u32, 1, 1),
            shared_mem_bytes: self.enc.smem_bytes as u32,
        };
        let mut b = self.stream.launch_builder(&self.func);
        b.arg(&params);
        // SAFETY: Params points at live device buffers sized by the encoder for this plan; the kernel only
        // touches the ranges the plan validation and the encoder established.
        unsafe { b.launch_cooperative(cfg) }.context("launching the megakernel")?;
        self.t = toks.len();
        Ok(())
    }

    /// The tokens the in-kernel argmax / sampler chose for each of the last forward's tokens.
    pub fn sampled(&self) -> Result<Vec<u32>> {
        let v = self.stream.memcpy_dtov(&self.out_tokens.slice(0..self.t))?;
        Ok(v.into_iter().map(|x| x as u32).collect())
    }

    /// Record per-instruction, per-block timestamps in every following forward.
    pub fn enable_profile(&mut self) -> Result<()> {
        // Per (instruction, block) timestamps, then per block 4 weight-ring counters.
        let n = self.ninstr * self.grid as usize * 4 + self.grid as usize * 4;
        self.prof = Some(self.stream.alloc_zeros::<u64>(n)?);
        Ok(())
    }

    /// The timestamps and weight-ring counters of the last forward (after `enable_profile`).
    pub fn read_profile(&self) -> Result<ForwardProfile> {
        let Some(buf) = self.prof.as_ref() else {
            bail!("profiling is not enabled");
        };
        let v = self.stream.memcpy_dtov(buf)?;
        let g = self.grid as usize;
        let instrs = (0..self.ninstr)
            .map(|i| InstrProfile {
                op: self.enc.instrs[i].op,
                blocks: (0..g)
                    .map(|b| {
                        let r = &v[(i * g + b) * 4..(i * g + b) * 4 + 4];
                        (r[0], r[1], r[2], r[3])
                    })
                    .collect(),
            })
            .collect();
        let mut ring = [0u64; 4];
        for b in 0..g {
            let base = self.ninstr * g * 4 + b * 4;
            for (k, o) in ring.iter_mut().enumerate() {
                *o += v[base + k];
            }
        }
        Ok(ForwardProfile { instrs, ring })
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize()?;
        Ok(())
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Copy rows `0..t` of an arena buffer to the host.
    fn read_rows(&self, offset: usize, width: usize, t: usize) -> Result<Vec<f32>> {
        Ok(self
            .stream
            .memcpy_dtov(&self.arena.slice(offset..offset + width * t))?)
    }
}

impl Backend for CudaSession {
    fn forward(&mut self, tokens: &[u32], start: usize) -> Result<()> {
        self.launch(tokens, start)?;
        if self.read_logits {
            let (off, w) = self.enc.logits;
            let rows = self.read_rows(off, w, tokens.len())?;
            self.logits[..rows.len()].copy_from_slice(&rows);
        } else {
            self.stream.synchronize()?;
        }
        Ok(())
    }
    fn logits(&self, t: usize) -> &[f32] {
        let v = self.model.plan.model.vocab;
        &self.logits[t * v..(t + 1) * v]
    }
    fn hidden(&self, _name: &str, _t: usize) -> Option<&[f32]> {
        None
    }
    fn max_tokens(&self) -> usize {
        self.model.plan.max_tokens
    }
    fn max_ctx(&self) -> usize {
        self.max_ctx
    }
}

#[cfg(test)]
mod tests {
    use super::image_names_entry;

    #[test]
    fn entry_names_are_matched_as_whole_identifiers() {
        // A cubin's string table: NUL-separated names, section names with a '.' prefix.
        let elf =
            b"\0.text.mimo_forward\0mimo_forward\0.nv.info.mimo_fp4_repack\0mimo_fp4_repack\0";
        assert!(image_names_entry(elf, "mimo_forward"));
        assert!(image_names_entry(elf, "mimo_fp4_repack"));
        assert!(!image_names_entry(elf, "mimo_tmap_marker"));
        // PTX text.
        let ptx = b".visible .entry mimo_tmap_marker()\n{\n ret;\n}\n.visible .entry mimo_forward(";
        assert!(image_names_entry(ptx, "mimo_tmap_marker"));
        // Longer identifiers that contain the name do not count.
        assert!(!image_names_entry(
            b"\0mimo_forward_v2\0xmimo_forward\0",
            "mimo_forward"
        ));
        assert!(!image_names_entry(b"", "mimo_forward"));
        assert!(image_names_entry(b"mimo_forward", "mimo_forward"));
    }
}
