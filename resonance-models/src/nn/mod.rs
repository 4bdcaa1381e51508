pub mod attention;
pub mod cpu_attention;
pub mod cpu_math;
pub mod fused_attention;
pub mod linear;
pub mod rope;
pub mod silu_gate;
