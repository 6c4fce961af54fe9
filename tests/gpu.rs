//! GPU offload (builds with the `vulkan` or `cuda` feature; `scripts/test-vulkan` runs them on
//! Mesa's lavapipe, `scripts/test-cuda` on an NVIDIA GPU): blocks really run on the GPU, give
//! the CPU's logits within the backend's arithmetic, with every KV type, full attention and a
//! rolling window, prefill, decode and batched steps; device errors are clear.
//!
//! `MISTRALD_GPU_LAYERS` says how many blocks the other test programs (engine, trained model,
//! scheduler) offload when the scripts run them; these tests check it took effect.
#![cfg(any(feature = "vulkan", feature = "cuda"))]

mod common;

use common::*;
use mistrald::engine::{AttentionChoice, Engine, EngineConfig};
use mistrald::ggml::{Device, GgmlType};
use mistrald::kv_cache::KvType;
use mistrald::model::offload::{GpuLayers, GpuRequest};
use mistrald::model::{LoadOptions, MappedGguf, Model};
use std::path::Path;

fn gpu() -> Device {
    *Device::gpus().first().expect(
        "a GPU build's tests need a GPU (for lavapipe set GGML_VK_VISIBLE_DEVICES=0, as scripts/test-vulkan does)",
    )
}

/// An engine over `path` with `layers` offloaded (`Count(0)`: the CPU with ggml's attention
/// and products, the arithmetic the GPU reproduces).
fn engine(path: &Path, layers: GpuLayers, kv: KvType, window: Option<usize>) -> Engine {
    let load = LoadOptions {
        repack: false,
        native_matmul: layers == GpuLayers::Count(0),
        gpu: GpuRequest {
            layers,
            device: None,
            kv_bytes_per_layer: 0,
        },
    };
    let model = Model::load_with(MappedGguf::open(path).unwrap(), load).unwrap();
    let cfg = EngineConfig {
        n_threads: 2,
        kv_type: kv,
        sliding_window: Some(window.unwrap_or(0)),
        ctx_size: Some(64),
        batch_size: 7,
        attention: AttentionChoice::Native,
    };
    Engine::new(model, cfg).unwrap()
}

/// Logits of: a 30-token prompt in chunks of 7, then 10 tokens decoded one by one, while a
/// second sequence prefills and decodes in the same steps.
fn run(eng: &mut Engine) -> (Vec<f32>, Vec<f32>) {
    // a: chunks of 7 up to 30, then single tokens; b: single tokens, then chunks of 5.
    interleave(
        eng,
        &tokens(40, 3),
        &tokens(40, 4),
        |done| if done < 30 { 7.min(30 - done) } else { 1 },
        |done| if done < 10 { 1 } else { 5 },
    )
}

#[test]
fn offloaded_blocks_give_the_cpus_logits() {
    let dir = tempdir();
    for ty in [GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0] {
        let path = tiny_model(dir.path(), ty);
        for kv in [KvType::F32, KvType::F16, KvType::Q8_0] {
            // Full attention, and a window of 8 over a ring of 8 slots that rolls five times.
            for window in [None, Some(8)] {
                let mut cpu = engine(&path, GpuLayers::Count(0), kv, window);
                assert!(cpu.gpu_usage().is_none());
                let want = run(&mut cpu);
                for layers in [GpuLayers::All, GpuLayers::Count(1)] {
                    let mut eng = engine(&path, layers, kv, window);
                    let usage = eng.gpu_usage().expect("blocks offloaded");
                    let n_layer = eng.hparams().n_layer;
                    assert_eq!(usage.device, gpu());
                    assert_eq!(
                        usage.layers,
                        if layers == GpuLayers::All { n_layer } else { 1 }
                    );
                    assert_eq!(usage.output, layers == GpuLayers::All);
                    assert!(usage.weight_bytes > 0 && usage.kv_bytes_per_sequence > 0);
                    let got = run(&mut eng);
                    let scale = want.0.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let diff = max_abs_diff(&got.0, &want.0).max(max_abs_diff(&got.1, &want.1));
                    println!("{ty} kv {kv:?} window {window:?} layers {layers}: max |diff| {diff} (logits up to {scale})");
                    assert!(
                        diff <= 0.02 * scale.max(1.0),
                        "{ty} kv {kv:?} window {window:?} layers {layers}: max |diff| {diff} against logits up to {scale}"
                    );
                    assert!(eng.gpu_usage().unwrap().compute_bytes > 0);
                }
            }
        }
    }
}

#[test]
fn the_environment_decides_the_default_offload() {
    // What scripts/test-vulkan sets for the other test programs must take effect.
    let dir = tempdir();
    let path = tiny_model(dir.path(), GgmlType::Q8_0);
    let model = Model::load(MappedGguf::open(&path).unwrap()).unwrap();
    let n_layer = model.hparams.n_layer;
    let want = match std::env::var("MISTRALD_GPU_LAYERS").ok().as_deref() {
        None | Some("auto") | Some("all") => n_layer,
        Some(n) => n.parse::<usize>().unwrap().min(n_layer),
    };
    let got = model.gpu().map_or(0, |g| g.placement.n_layers(n_layer));
    assert_eq!(got, want, "offloaded blocks by default");
}

#[test]
fn devices_are_found_by_name_and_missing_ones_named() {
    let dev = gpu();
    assert_eq!(Device::find_gpu(&dev.name()).unwrap(), dev);
    assert_eq!(
        Device::find_gpu(&dev.name().to_lowercase()).unwrap(),
        dev,
        "names compare without case"
    );
    let err = Device::find_gpu("NoSuchGPU7").unwrap_err().to_string();
    assert!(
        err.contains("'NoSuchGPU7' not found") && err.contains(&dev.name()),
        "{err}"
    );
    let (free, total) = dev.memory();
    assert!(total > 0 && free <= total, "{free} of {total}");

    let dir = tempdir();
    let path = tiny_model(dir.path(), GgmlType::Q8_0);
    let load = LoadOptions {
        gpu: GpuRequest {
            layers: GpuLayers::All,
            device: Some("NoSuchGPU7".into()),
            kv_bytes_per_layer: 0,
        },
        ..LoadOptions::default()
    };
    let err = Model::load_with(MappedGguf::open(&path).unwrap(), load)
        .err()
        .expect("unknown device refused")
        .to_string();
    assert!(err.contains("NoSuchGPU7"), "{err}");
}

#[test]
fn auto_offload_leaves_room_for_the_kv_caches() {
    // A KV reservation larger than the GPU's memory leaves no room for any block: CPU only.
    let dir = tempdir();
    let path = tiny_model(dir.path(), GgmlType::Q8_0);
    let (_, total) = gpu().memory();
    let load = |kv_bytes_per_layer| LoadOptions {
        gpu: GpuRequest {
            layers: GpuLayers::Auto,
            device: None,
            kv_bytes_per_layer,
        },
        ..LoadOptions::default()
    };
    let model = Model::load_with(MappedGguf::open(&path).unwrap(), load(total)).unwrap();
    assert!(model.gpu().is_none());
    let model = Model::load_with(MappedGguf::open(&path).unwrap(), load(0)).unwrap();
    let g = model.gpu().expect("a tiny model fits");
    assert_eq!(
        g.placement.n_layers(model.hparams.n_layer),
        model.hparams.n_layer
    );
    assert!(g.placement.output);
}
