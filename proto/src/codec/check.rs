//! Checks shared by encoding and decoding that a set of tensors fits the model: a delta's base,
//! top-k's residual and a blob's tensors must all line up with the model's names and shapes, and
//! every value sent or received must be finite. Both directions refuse the same inputs with the
//! same errors, so the checks live once, here.

use std::collections::{HashMap, HashSet};

use crate::blob::{BlobError, NamedTensor, Parameters, all_finite};

/// For each model tensor `(name, shape)`, the index in `other` of the tensor of that name,
/// which must have that shape and fill it, and nothing else in `other`.
pub(super) fn align<'m>(
    role: &'static str,
    model: impl Iterator<Item = (&'m str, &'m [usize])>,
    other: &Parameters,
) -> Result<Vec<usize>, BlobError> {
    let by_name: HashMap<&str, usize> = other
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (name, shape) in model {
        let layout = |problem: String| BlobError::Layout {
            role,
            tensor: name.to_string(),
            problem,
        };
        let &i = by_name
            .get(name)
            .ok_or_else(|| layout("it has no such tensor".into()))?;
        let t = &other.tensors[i];
        if t.shape != shape {
            return Err(layout(format!(
                "its shape is {:?}, the model's {shape:?}",
                t.shape
            )));
        }
        if t.data.len() != numel(shape) {
            return Err(layout(format!(
                "it holds {} values for shape {shape:?}",
                t.data.len()
            )));
        }
        seen.insert(name);
        out.push(i);
    }
    if out.len() != other.tensors.len()
        && let Some(extra) = other
            .tensors
            .iter()
            .find(|t| !seen.contains(t.name.as_str()))
    {
        return Err(BlobError::Layout {
            role,
            tensor: extra.name.clone(),
            problem: "the model has no such tensor".into(),
        });
    }
    Ok(out)
}

pub(super) fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

pub(super) fn check_length(t: &NamedTensor) -> Result<(), BlobError> {
    let expected = numel(&t.shape);
    if t.data.len() != expected {
        return Err(BlobError::Length {
            tensor: t.name.clone(),
            shape: t.shape.clone(),
            expected,
            actual: t.data.len(),
        });
    }
    Ok(())
}

pub(super) fn check_finite(name: &str, values: &[f32]) -> Result<(), BlobError> {
    if !all_finite(values)
        && let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite())
    {
        return Err(BlobError::NonFinite {
            tensor: name.to_string(),
            index,
            value,
        });
    }
    Ok(())
}
