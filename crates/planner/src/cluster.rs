//! Hardware presets: one GPU type, the links inside a node and the network
//! between nodes, each value with its source.

use crate::error::PlanError;

/// A cluster of identical nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSpec {
    /// Preset name (`p4d`, ...).
    pub name: String,
    /// What it is, for people (`p4d.24xlarge: 8x A100-SXM4-40GB, 400 Gbps EFA`).
    pub description: String,
    /// GPUs in one node.
    pub gpus_per_node: u64,
    /// Memory of one GPU, GiB.
    pub gpu_memory_gib: f64,
    /// Dense 16-bit (fp16 or bf16) tensor-core peak of one GPU, TFLOPS.
    pub peak_tflops: f64,
    /// Memory bandwidth of one GPU, GB/s (bounds the optimizer step).
    pub hbm_gbps: f64,
    /// NVLink bandwidth of one GPU in one direction, GB/s.
    pub intra_node_gbps: f64,
    /// Network bandwidth of one node, Gbit/s (as the instance is sold).
    pub inter_node_gbit: f64,
    /// Per-hop latency of a ring step over NVLink, microseconds.
    pub intra_latency_us: f64,
    /// Per-hop latency of a ring step over the network, microseconds.
    pub inter_latency_us: f64,
    /// Fixed cost of launching one collective, microseconds.
    pub base_latency_us: f64,
    /// Fraction of the nominal link bandwidth a ring collective reaches on
    /// large messages.
    pub bandwidth_efficiency: f64,
    /// Fraction of the peak the transformer's kernels reach while computing.
    pub compute_efficiency: f64,
    /// Memory kept back from the model on each GPU (CUDA context, cuBLAS
    /// workspace, NCCL buffers, allocator fragmentation), GiB.
    pub reserved_gib: f64,
}

/// Names accepted by [`ClusterSpec::preset`].
pub const CLUSTER_PRESETS: &[&str] = &["p3dn", "p4d", "p4de", "h100"];

// Latencies common to all presets, from NCCL's own cost model
// (src/graph/tuning.cc, NCCL 2.x): ring/Simple protocol base latency 8.4 us per
// collective, 5.7 us per NVLink hop and 9.6 us per network hop. EFA's one-way
// latency is no lower than InfiniBand's, so these are optimistic for the network.
// Every message pays the Simple protocol's latency: NCCL over EFA is commonly run
// with the Simple protocol only (LL and LL128 rely on in-order delivery, which
// EFA's SRD transport does not promise); inside a node NCCL would pick LL for
// tiny messages, so small NVLink-only collectives are overstated.
const BASE_LATENCY_US: f64 = 8.4;
const NVLINK_HOP_US: f64 = 5.7;
const NET_HOP_US: f64 = 9.6;

// nccl-tests typically report bus bandwidths of about 80% of the nominal link
// rate on large messages (e.g. ~230-240 GB/s all-reduce bus bandwidth on
// DGX-A100's 300 GB/s NVSwitch links). We apply 0.8 to NVLink and network alike;
// this is a judgement, not a measurement on these instances.
const BANDWIDTH_EFFICIENCY: f64 = 0.8;

// CUDA context (~0.5-1 GiB), cuBLAS workspace, NCCL buffers and fragmentation.
const RESERVED_GIB: f64 = 2.0;

impl ClusterSpec {
    /// A named preset (see [`CLUSTER_PRESETS`]).
    ///
    /// The compute efficiency (fraction of peak while computing, communication
    /// aside) is an assumption: large transformer GEMMs reach 60-80% of the
    /// tensor-core peak on A100 and H100; we use 0.6 for A100 and H100 and 0.5
    /// for V100, whose fp16 kernels are less efficient at BERT's sizes.
    pub fn preset(name: &str) -> Result<Self, PlanError> {
        let spec = match name {
            // AWS p3dn.24xlarge: 8x V100-SXM2-32GB, 100 Gbps networking (AWS
            // instance page). V100 SXM2: 125 TFLOPS fp16 tensor, 900 GB/s HBM2
            // (NVIDIA V100 datasheet); NVLink 2.0 with 6 links x 25 GB/s per
            // direction = 150 GB/s per GPU per direction (300 GB/s total), in a
            // hybrid cube-mesh rather than through an NVSwitch.
            "p3dn" => Self {
                name: name.to_string(),
                description: "p3dn.24xlarge: 8x V100-SXM2-32GB, NVLink 2.0, 100 Gbps network"
                    .to_string(),
                gpus_per_node: 8,
                gpu_memory_gib: 32.0,
                peak_tflops: 125.0,
                hbm_gbps: 900.0,
                intra_node_gbps: 150.0,
                inter_node_gbit: 100.0,
                compute_efficiency: 0.5,
                ..Self::common()
            },
            // AWS p4d.24xlarge: 8x A100-SXM4-40GB, NVSwitch, 400 Gbps EFA (4x 100
            // Gbps; AWS instance page). A100: 312 TFLOPS bf16/fp16 dense, 1555 GB/s
            // HBM2 (40 GB), NVLink 3 600 GB/s total = 300 GB/s per direction
            // (NVIDIA A100 datasheet).
            "p4d" => Self {
                name: name.to_string(),
                description: "p4d.24xlarge: 8x A100-SXM4-40GB, NVSwitch, 400 Gbps EFA".to_string(),
                gpus_per_node: 8,
                gpu_memory_gib: 40.0,
                peak_tflops: 312.0,
                hbm_gbps: 1555.0,
                intra_node_gbps: 300.0,
                inter_node_gbit: 400.0,
                compute_efficiency: 0.6,
                ..Self::common()
            },
            // AWS p4de.24xlarge: as p4d with A100-SXM4-80GB (2039 GB/s HBM2e,
            // NVIDIA A100 datasheet), 400 Gbps EFA.
            "p4de" => Self {
                name: name.to_string(),
                description: "p4de.24xlarge: 8x A100-SXM4-80GB, NVSwitch, 400 Gbps EFA".to_string(),
                gpus_per_node: 8,
                gpu_memory_gib: 80.0,
                peak_tflops: 312.0,
                hbm_gbps: 2039.0,
                intra_node_gbps: 300.0,
                inter_node_gbit: 400.0,
                compute_efficiency: 0.6,
                ..Self::common()
            },
            // An H100 node such as AWS p5.48xlarge: 8x H100-SXM5-80GB, 3200 Gbps
            // EFA (AWS instance page). H100 SXM: 989 TFLOPS bf16 dense (1979 with
            // sparsity), 3.35 TB/s HBM3, NVLink 4 900 GB/s total = 450 GB/s per
            // direction (NVIDIA H100 datasheet).
            "h100" => Self {
                name: name.to_string(),
                description: "8x H100-SXM5-80GB (p5.48xlarge), NVSwitch, 3200 Gbps EFA".to_string(),
                gpus_per_node: 8,
                gpu_memory_gib: 80.0,
                peak_tflops: 989.0,
                hbm_gbps: 3350.0,
                intra_node_gbps: 450.0,
                inter_node_gbit: 3200.0,
                compute_efficiency: 0.6,
                ..Self::common()
            },
            _ => {
                return Err(PlanError::UnknownCluster {
                    name: name.to_string(),
                    presets: CLUSTER_PRESETS.join(", "),
                });
            }
        };
        Ok(spec)
    }

    fn common() -> Self {
        Self {
            name: String::new(),
            description: String::new(),
            gpus_per_node: 8,
            gpu_memory_gib: 0.0,
            peak_tflops: 0.0,
            hbm_gbps: 0.0,
            intra_node_gbps: 0.0,
            inter_node_gbit: 0.0,
            intra_latency_us: NVLINK_HOP_US,
            inter_latency_us: NET_HOP_US,
            base_latency_us: BASE_LATENCY_US,
            bandwidth_efficiency: BANDWIDTH_EFFICIENCY,
            compute_efficiency: 0.6,
            reserved_gib: RESERVED_GIB,
        }
    }

    /// Effective NVLink bandwidth of one GPU in one direction, bytes/s.
    pub fn intra_bytes_per_s(&self) -> f64 {
        self.intra_node_gbps * 1e9 * self.bandwidth_efficiency
    }

    /// Effective network bandwidth of one node in one direction, bytes/s.
    pub fn inter_bytes_per_s(&self) -> f64 {
        self.inter_node_gbit / 8.0 * 1e9 * self.bandwidth_efficiency
    }

    /// Sustained FLOP/s of one GPU while it computes.
    pub fn sustained_flops(&self) -> f64 {
        self.peak_tflops * 1e12 * self.compute_efficiency
    }
}
