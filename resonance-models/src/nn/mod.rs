pub mod attention;
pub mod linear;
pub mod rope;
