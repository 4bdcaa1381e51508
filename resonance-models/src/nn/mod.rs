pub mod attention;
pub mod rope;
