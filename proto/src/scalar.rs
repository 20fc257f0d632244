//! Conversions between wire [`Scalar`] maps and Rust values.

use std::collections::HashMap;

use crate::fleet::{Scalar, scalar::Value};

/// A config or metrics map as it travels.
pub type ScalarMap = HashMap<String, Scalar>;

pub fn f64(v: f64) -> Scalar {
    Scalar {
        value: Some(Value::Double(v)),
    }
}

pub fn int(v: i64) -> Scalar {
    Scalar {
        value: Some(Value::Int(v)),
    }
}

pub fn string(v: impl Into<String>) -> Scalar {
    Scalar {
        value: Some(Value::String(v.into())),
    }
}

pub fn bool(v: bool) -> Scalar {
    Scalar {
        value: Some(Value::Bool(v)),
    }
}

/// Reads a number (double or int) as f64.
pub fn as_f64(s: &Scalar) -> Option<f64> {
    match s.value.as_ref()? {
        Value::Double(v) => Some(*v),
        Value::Int(v) => Some(*v as f64),
        _ => None,
    }
}

/// Reads an int, or a double that holds a whole number.
pub fn as_i64(s: &Scalar) -> Option<i64> {
    match s.value.as_ref()? {
        Value::Int(v) => Some(*v),
        Value::Double(v) if v.fract() == 0.0 => Some(*v as i64),
        _ => None,
    }
}

pub fn as_str(s: &Scalar) -> Option<&str> {
    match s.value.as_ref()? {
        Value::String(v) => Some(v),
        _ => None,
    }
}

/// The numeric entries of a map, for metrics records.
pub fn numeric_entries(map: &ScalarMap) -> impl Iterator<Item = (&str, f64)> {
    map.iter()
        .filter_map(|(k, v)| as_f64(v).map(|x| (k.as_str(), x)))
}
