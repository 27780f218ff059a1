//! STUB: quantized dot products (to be written).
