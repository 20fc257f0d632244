//! MNIST in the standard IDX format (optionally gzip-compressed), as published by LeCun et al.
//!
//! Images become f32 standardised with the training set's pixel mean and standard deviation
//! (0.1307, 0.3081; the usual PyTorch MNIST transform), row-major 28x28; labels are 0..=9.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

pub const IMAGE_SIDE: usize = 28;
pub const IMAGE_PIXELS: usize = IMAGE_SIDE * IMAGE_SIDE;
pub const NUM_CLASSES: usize = 10;
/// Mean and standard deviation of MNIST training pixels scaled to [0, 1].
pub const PIXEL_MEAN: f32 = 0.1307;
pub const PIXEL_STD: f32 = 0.3081;

#[derive(Debug, thiserror::Error)]
pub enum MnistError {
    #[error(
        "{path}: {source}. MNIST is expected as IDX files (train-images-idx3-ubyte[.gz], ...) in the data directory; the repository ships them in data/mnist"
    )]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not an IDX {kind} file: {reason}")]
    Format {
        path: PathBuf,
        kind: &'static str,
        reason: String,
    },
    #[error("{images} images but {labels} labels")]
    Mismatch { images: usize, labels: usize },
}

/// A split of MNIST held in memory.
#[derive(Debug, Clone)]
pub struct MnistSplit {
    /// `len * 784` standardised pixels.
    pub images: Vec<f32>,
    pub labels: Vec<u8>,
}

impl MnistSplit {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image(&self, i: usize) -> &[f32] {
        &self.images[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS]
    }
}

/// Both splits.
#[derive(Debug, Clone)]
pub struct Mnist {
    pub train: MnistSplit,
    pub test: MnistSplit,
}

impl Mnist {
    /// Loads `train-*` and `t10k-*` from `dir`, accepting `.gz` or uncompressed files.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, MnistError> {
        let dir = dir.as_ref();
        Ok(Self {
            train: load_split(dir, "train")?,
            test: load_split(dir, "t10k")?,
        })
    }
}

fn open(dir: &Path, stem: &str) -> Result<(PathBuf, Box<dyn Read>), MnistError> {
    let gz = dir.join(format!("{stem}.gz"));
    let plain = dir.join(stem);
    let (path, reader): (PathBuf, Box<dyn Read>) = if gz.exists() {
        let f = File::open(&gz).map_err(|source| MnistError::Io {
            path: gz.clone(),
            source,
        })?;
        (gz, Box::new(GzDecoder::new(BufReader::new(f))))
    } else {
        let f = File::open(&plain).map_err(|source| MnistError::Io {
            path: plain.clone(),
            source,
        })?;
        (plain, Box::new(BufReader::new(f)))
    };
    Ok((path, reader))
}

fn read_all(path: &Path, mut r: Box<dyn Read>) -> Result<Vec<u8>, MnistError> {
    let mut buf = Vec::new();
    r.read_to_end(&mut buf).map_err(|source| MnistError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(buf)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses an IDX3 image file: magic 0x00000803, count, rows, cols, then bytes.
pub fn parse_images(path: &Path, b: &[u8]) -> Result<Vec<f32>, MnistError> {
    let bad = |reason: String| MnistError::Format {
        path: path.to_path_buf(),
        kind: "image",
        reason,
    };
    if b.len() < 16 {
        return Err(bad(format!("{} bytes is shorter than the header", b.len())));
    }
    if be_u32(b, 0) != 0x0803 {
        return Err(bad(format!(
            "magic {:#010x}, expected 0x00000803",
            be_u32(b, 0)
        )));
    }
    let (n, rows, cols) = (
        be_u32(b, 4) as usize,
        be_u32(b, 8) as usize,
        be_u32(b, 12) as usize,
    );
    if rows != IMAGE_SIDE || cols != IMAGE_SIDE {
        return Err(bad(format!("images are {rows}x{cols}, expected 28x28")));
    }
    let body = &b[16..];
    if body.len() != n * IMAGE_PIXELS {
        return Err(bad(format!(
            "header says {n} images ({} bytes), file has {} bytes",
            n * IMAGE_PIXELS,
            body.len()
        )));
    }
    Ok(body
        .iter()
        .map(|&p| (p as f32 / 255.0 - PIXEL_MEAN) / PIXEL_STD)
        .collect())
}

/// Parses an IDX1 label file: magic 0x00000801, count, then bytes.
pub fn parse_labels(path: &Path, b: &[u8]) -> Result<Vec<u8>, MnistError> {
    let bad = |reason: String| MnistError::Format {
        path: path.to_path_buf(),
        kind: "label",
        reason,
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
    if let Some(pos) = body.iter().position(|&l| l as usize >= NUM_CLASSES) {
        return Err(bad(format!(
            "label {} at index {pos} is not a digit",
            body[pos]
        )));
    }
    Ok(body.to_vec())
}

fn load_split(dir: &Path, prefix: &str) -> Result<MnistSplit, MnistError> {
    let (ip, ir) = open(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let images = parse_images(&ip, &read_all(&ip, ir)?)?;
    let (lp, lr) = open(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    let labels = parse_labels(&lp, &read_all(&lp, lr)?)?;
    if images.len() / IMAGE_PIXELS != labels.len() {
        return Err(MnistError::Mismatch {
            images: images.len() / IMAGE_PIXELS,
            labels: labels.len(),
        });
    }
    Ok(MnistSplit { images, labels })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idx_headers_are_checked() {
        let p = Path::new("x");
        let mut labels = vec![0, 0, 8, 1, 0, 0, 0, 2, 3, 9];
        assert_eq!(parse_labels(p, &labels).expect("valid"), vec![3, 9]);
        labels[9] = 10;
        assert!(
            parse_labels(p, &labels)
                .unwrap_err()
                .to_string()
                .contains("not a digit")
        );
        let mut images = vec![0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 28, 0, 0, 0, 28];
        images.extend(std::iter::repeat_n(255u8, IMAGE_PIXELS));
        let px = parse_images(p, &images).expect("valid");
        assert_eq!(px.len(), IMAGE_PIXELS);
        assert!((px[0] - (1.0 - PIXEL_MEAN) / PIXEL_STD).abs() < 1e-6);
        images.pop();
        assert!(parse_images(p, &images).is_err());
        assert!(parse_images(p, b"junk").is_err());
    }
}
