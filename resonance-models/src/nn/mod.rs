pub mod attention;
pub mod cpu_attention;
pub mod fused_attention;
pub mod linear;
pub mod rope;
