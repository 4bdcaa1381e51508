pub mod attention;
pub mod fused_attention;
pub mod linear;
pub mod rope;
