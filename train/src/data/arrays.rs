//! Data that is already tensors: NumPy `.npy` arrays (features `[examples, ...]` and labels or
//! targets `[examples]`) and MNIST in its IDX format.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use flate2::read::GzDecoder;
use npyz::{DType, NpyFile, Order, TypeChar};

use super::DataError;

/// Examples of one shape, with their labels (or regression targets) when given.
#[derive(Debug, Clone, PartialEq)]
pub struct Arrays {
    pub origin: String,
    /// The shape of one example.
    pub shape: Vec<usize>,
    /// `examples * prod(shape)` values, example-major.
    pub x: Vec<f32>,
    /// One label (class index or any number) or target per example.
    pub y: Option<Vec<f64>>,
}

impl Arrays {
    pub fn len(&self) -> usize {
        let per: usize = self.shape.iter().product();
        self.x.len().checked_div(per).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn example(&self, i: usize) -> &[f32] {
        let per: usize = self.shape.iter().product();
        &self.x[i * per..(i + 1) * per]
    }

    /// The examples `rows`, in that order.
    pub fn select(&self, rows: &[usize]) -> Arrays {
        let mut x = Vec::with_capacity(rows.len() * self.shape.iter().product::<usize>());
        for &r in rows {
            x.extend_from_slice(self.example(r));
        }
        Arrays {
            origin: self.origin.clone(),
            shape: self.shape.clone(),
            x,
            y: self
                .y
                .as_ref()
                .map(|y| rows.iter().map(|&r| y[r]).collect()),
        }
    }

    /// Reads `features` (`[examples, ...]`) and, when given, `labels` (`[examples]`).
    pub fn read_npy(features: &Path, labels: Option<&Path>) -> Result<Self, DataError> {
        let (shape, values) = read_npy_f64(features)?;
        let Some((&n, per_example)) = shape.split_first() else {
            return Err(DataError::Format {
                path: features.display().to_string(),
                reason: "a 0-d array holds no examples; save features as [examples, ...]".into(),
            });
        };
        let mut per_example = per_example.to_vec();
        if per_example.is_empty() {
            // One number per example: a single feature.
            per_example.push(1);
        }
        let y = match labels {
            None => None,
            Some(path) => {
                let (lshape, lvalues) = read_npy_f64(path)?;
                let examples = lshape.first().copied().unwrap_or(0);
                if lshape.len() > 2 || (lshape.len() == 2 && lshape[1] != 1) || examples != n {
                    return Err(DataError::Mismatch {
                        origin: path.display().to_string(),
                        reason: format!(
                            "labels have shape {lshape:?}; {} holds {n} examples, so [{n}] was expected",
                            features.display()
                        ),
                    });
                }
                Some(lvalues)
            }
        };
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            let per: usize = per_example.iter().product();
            return Err(DataError::Format {
                path: features.display().to_string(),
                reason: format!(
                    "example {}, value {} is {}, not a finite number",
                    i / per,
                    i % per,
                    values[i]
                ),
            });
        }
        Ok(Arrays {
            origin: features.display().to_string(),
            shape: per_example,
            x: values.into_iter().map(|v| v as f32).collect(),
            y,
        })
    }
}

/// An array's shape and its values as f64 (bool, integer and float dtypes, C order).
fn read_npy_f64(path: &Path) -> Result<(Vec<usize>, Vec<f64>), DataError> {
    let origin = path.display().to_string();
    let io = |source| DataError::Io {
        path: origin.clone(),
        source,
    };
    let bad = |reason: String| DataError::Format {
        path: origin.clone(),
        reason,
    };
    let npy = NpyFile::new(BufReader::new(File::open(path).map_err(io)?))
        .map_err(|e| bad(format!("not a .npy file: {e}")))?;
    if npy.order() == Order::Fortran {
        return Err(bad(
            "the array is in Fortran order; save it with np.ascontiguousarray first".into(),
        ));
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let DType::Plain(ts) = npy.dtype() else {
        return Err(bad(
            "structured arrays are not supported; save plain numbers".into(),
        ));
    };
    let read = |e: std::io::Error| bad(format!("reading the values: {e}"));
    let values: Vec<f64> = match (ts.type_char(), ts.size_field()) {
        (TypeChar::Float, 8) => npy.into_vec::<f64>().map_err(read)?,
        (TypeChar::Float, 4) => conv(npy.into_vec::<f32>().map_err(read)?),
        (TypeChar::Int, 8) => npy
            .into_vec::<i64>()
            .map_err(read)?
            .into_iter()
            .map(|v| v as f64)
            .collect(),
        (TypeChar::Int, 4) => conv(npy.into_vec::<i32>().map_err(read)?),
        (TypeChar::Int, 2) => conv(npy.into_vec::<i16>().map_err(read)?),
        (TypeChar::Int, 1) => conv(npy.into_vec::<i8>().map_err(read)?),
        (TypeChar::Uint, 8) => npy
            .into_vec::<u64>()
            .map_err(read)?
            .into_iter()
            .map(|v| v as f64)
            .collect(),
        (TypeChar::Uint, 4) => conv(npy.into_vec::<u32>().map_err(read)?),
        (TypeChar::Uint, 2) => conv(npy.into_vec::<u16>().map_err(read)?),
        (TypeChar::Uint, 1) => conv(npy.into_vec::<u8>().map_err(read)?),
        (TypeChar::Bool, 1) => npy
            .into_vec::<bool>()
            .map_err(read)?
            .into_iter()
            .map(|b| if b { 1.0 } else { 0.0 })
            .collect(),
        _ => {
            return Err(bad(format!(
                "dtype {ts} is not supported; save bool, integer or float arrays"
            )));
        }
    };
    Ok((shape, values))
}

fn conv<T: Into<f64>>(values: Vec<T>) -> Vec<f64> {
    values.into_iter().map(Into::into).collect()
}

pub const MNIST_SIDE: usize = 28;
pub const MNIST_PIXELS: usize = MNIST_SIDE * MNIST_SIDE;
/// Mean and standard deviation of MNIST training pixels scaled to [0, 1] (the usual PyTorch
/// MNIST transform): the loader standardises with them, so MNIST tasks need no normalisation.
pub const MNIST_MEAN: f32 = 0.1307;
pub const MNIST_STD: f32 = 0.3081;

/// Which MNIST file pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MnistSplit {
    /// `train-*`: 60,000 examples.
    Train,
    /// `t10k-*`: 10,000 examples.
    Test,
}

impl MnistSplit {
    fn prefix(self) -> &'static str {
        match self {
            MnistSplit::Train => "train",
            MnistSplit::Test => "t10k",
        }
    }
}

fn open(dir: &Path, stem: &str) -> Result<(String, Box<dyn Read>), DataError> {
    let gz = dir.join(format!("{stem}.gz"));
    let plain = dir.join(stem);
    let (path, gzipped) = if gz.exists() {
        (gz, true)
    } else {
        (plain, false)
    };
    let origin = path.display().to_string();
    let file = File::open(&path).map_err(|source| DataError::Io {
        path: format!(
            "{origin} (MNIST is expected as IDX files train-images-idx3-ubyte[.gz], ... in the folder; the repository ships them in data/mnist)"
        ),
        source,
    })?;
    let reader: Box<dyn Read> = if gzipped {
        Box::new(GzDecoder::new(BufReader::new(file)))
    } else {
        Box::new(BufReader::new(file))
    };
    Ok((origin, reader))
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses an IDX1 label file: magic 0x00000801, count, then one byte per label.
pub fn parse_mnist_labels(origin: &str, b: &[u8]) -> Result<Vec<u8>, DataError> {
    let bad = |reason: String| DataError::Format {
        path: origin.to_string(),
        reason: format!("not an IDX label file: {reason}"),
    };
    if b.len() < 8 {
        return Err(bad(format!("{} bytes is shorter than the header", b.len())));
    }
    if be_u32(b, 0) != 0x0801 {
        return Err(bad(format!(
            "magic {:#010x}, expected 0x00000801",
            be_u32(b, 0)
        )));
    }
    let n = be_u32(b, 4) as usize;
    let body = &b[8..];
    if body.len() != n {
        return Err(bad(format!(
            "header says {n} labels, file has {}",
            body.len()
        )));
    }
    if let Some(pos) = body.iter().position(|&l| l > 9) {
        return Err(bad(format!(
            "label {} at index {pos} is not a digit",
            body[pos]
        )));
    }
    Ok(body.to_vec())
}

/// Reads the labels of an MNIST split.
pub fn mnist_labels(dir: &Path, split: MnistSplit) -> Result<Vec<u8>, DataError> {
    let (origin, mut reader) = open(dir, &format!("{}-labels-idx1-ubyte", split.prefix()))?;
    let mut bytes = Vec::new();
    reader
        .read_to_end(&mut bytes)
        .map_err(|source| DataError::Io {
            path: origin.clone(),
            source,
        })?;
    parse_mnist_labels(&origin, &bytes)
}

/// Reads the images `keep` (sorted ascending) of an MNIST split, standardised, streaming the
/// file so that only the kept images are ever held: a device with a shard of MNIST holds that
/// shard, not the 60,000 images.
pub fn mnist_images(dir: &Path, split: MnistSplit, keep: &[usize]) -> Result<Vec<f32>, DataError> {
    let (origin, mut reader) = open(dir, &format!("{}-images-idx3-ubyte", split.prefix()))?;
    let bad = |reason: String| DataError::Format {
        path: origin.clone(),
        reason: format!("not an IDX image file: {reason}"),
    };
    let mut header = [0u8; 16];
    reader
        .read_exact(&mut header)
        .map_err(|e| bad(format!("header: {e}")))?;
    if be_u32(&header, 0) != 0x0803 {
        return Err(bad(format!(
            "magic {:#010x}, expected 0x00000803",
            be_u32(&header, 0)
        )));
    }
    let (n, rows, cols) = (
        be_u32(&header, 4) as usize,
        be_u32(&header, 8) as usize,
        be_u32(&header, 12) as usize,
    );
    if rows != MNIST_SIDE || cols != MNIST_SIDE {
        return Err(bad(format!("images are {rows}x{cols}, expected 28x28")));
    }
    if let Some(&last) = keep.last()
        && last >= n
    {
        return Err(bad(format!("image {last} asked for, the file has {n}")));
    }
    let mut out = Vec::with_capacity(keep.len() * MNIST_PIXELS);
    let mut image = [0u8; MNIST_PIXELS];
    let mut wanted = keep.iter().peekable();
    for i in 0..n {
        if wanted.peek().is_none() {
            break;
        }
        reader
            .read_exact(&mut image)
            .map_err(|e| bad(format!("image {i} of {n}: {e}")))?;
        if wanted.peek() == Some(&&i) {
            wanted.next();
            out.extend(
                image
                    .iter()
                    .map(|&p| (p as f32 / 255.0 - MNIST_MEAN) / MNIST_STD),
            );
        }
    }
    Ok(out)
}

/// MNIST examples `keep` of `split` (all when `None`), as `[1, 28, 28]` arrays with digit
/// labels.
pub fn read_mnist(
    dir: &Path,
    split: MnistSplit,
    keep: Option<Vec<usize>>,
) -> Result<Arrays, DataError> {
    let labels = mnist_labels(dir, split)?;
    let mut keep = keep.unwrap_or_else(|| (0..labels.len()).collect());
    keep.sort_unstable();
    keep.dedup();
    let x = mnist_images(dir, split, &keep)?;
    if x.len() != keep.len() * MNIST_PIXELS {
        return Err(DataError::Format {
            path: dir.display().to_string(),
            reason: format!(
                "{} images for {} labels",
                x.len() / MNIST_PIXELS,
                labels.len()
            ),
        });
    }
    Ok(Arrays {
        origin: dir.display().to_string(),
        shape: vec![1, MNIST_SIDE, MNIST_SIDE],
        x,
        y: Some(keep.iter().map(|&i| f64::from(labels[i])).collect()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idx_headers_are_checked() {
        let mut labels = vec![0, 0, 8, 1, 0, 0, 0, 2, 3, 9];
        assert_eq!(parse_mnist_labels("x", &labels).expect("valid"), vec![3, 9]);
        labels[9] = 10;
        let e = parse_mnist_labels("x", &labels)
            .expect_err("10")
            .to_string();
        assert!(e.contains("not a digit"), "{e}");
        assert!(parse_mnist_labels("x", b"junk").is_err());
    }

    #[test]
    fn a_shard_of_mnist_holds_only_its_images() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist");
        let all = read_mnist(&dir, MnistSplit::Test, Some(vec![0, 1, 2])).expect("reads");
        let some = read_mnist(&dir, MnistSplit::Test, Some(vec![2])).expect("reads");
        assert_eq!(some.len(), 1);
        assert_eq!(some.example(0), all.example(2));
        assert_eq!(
            some.y.as_deref(),
            Some(&all.y.as_deref().expect("labels")[2..3])
        );
        assert_eq!(some.shape, vec![1, 28, 28]);
    }
}

#[cfg(test)]
mod npy_tests {
    use super::*;

    /// A version 1.0 `.npy` file as NumPy writes it.
    fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        let shape = if dims.len() == 1 {
            format!("({},)", dims[0])
        } else {
            format!("({})", dims.join(", "))
        };
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((header.len() as u16).to_le_bytes());
        out.extend(header.as_bytes());
        out.extend(data);
        out
    }

    #[test]
    fn npy_features_and_labels_are_read_with_their_shape() {
        let dir = tempfile::tempdir().expect("tempdir");
        let x: Vec<u8> = (0..12)
            .flat_map(|i| (i as f64 * 0.5).to_le_bytes())
            .collect();
        std::fs::write(dir.path().join("x.npy"), npy("<f8", &[3, 2, 2], &x)).expect("write");
        let y: Vec<u8> = [2i64, 0, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(dir.path().join("y.npy"), npy("<i8", &[3], &y)).expect("write");
        let a = Arrays::read_npy(&dir.path().join("x.npy"), Some(&dir.path().join("y.npy")))
            .expect("reads");
        assert_eq!((a.len(), a.shape.clone()), (3, vec![2, 2]));
        assert_eq!(a.example(1), &[2.0, 2.5, 3.0, 3.5]);
        assert_eq!(a.y, Some(vec![2.0, 0.0, 1.0]));
        // Labels of another length are refused by name.
        let y2: Vec<u8> = [1u8, 0].to_vec();
        std::fs::write(dir.path().join("y2.npy"), npy("|u1", &[2], &y2)).expect("write");
        let e = Arrays::read_npy(&dir.path().join("x.npy"), Some(&dir.path().join("y2.npy")))
            .expect_err("2 labels for 3 examples")
            .to_string();
        assert!(e.contains("y2.npy") && e.contains("[3]"), "{e}");
        std::fs::write(dir.path().join("bad.npy"), b"not numpy").expect("write");
        let e = Arrays::read_npy(&dir.path().join("bad.npy"), None)
            .expect_err("junk")
            .to_string();
        assert!(
            e.contains("bad.npy") && e.contains("not a .npy file"),
            "{e}"
        );
    }
}
