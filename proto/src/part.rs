//! [`Part`]: one of `count` parts, written `INDEX/COUNT`, as a device's share of a data set
//! (`data.shard`) and a proxy's share of a fleet (`--shard`) are both given.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Most parts anything is split into: a proxy hashes every device id against each shard, and a
/// data share allocates a list per part, so a count of billions would hang or exhaust memory.
pub const MAX_COUNT: u32 = 65_536;

/// Part `index` of `count` (`index < count <= MAX_COUNT`), written and parsed as `INDEX/COUNT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Part {
    pub index: u32,
    pub count: u32,
}

impl FromStr for Part {
    type Err = String;

    /// Errors quote the input, so that they read well after the name of what was parsed:
    /// `--shard: "5/3": the index must be below the count`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not INDEX/COUNT (e.g. 0/3)"))?;
        let index: u32 = i
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: index {i:?} is not a whole number"))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: count {n:?} is not a whole number"))?;
        if count == 0 || index >= count {
            return Err(format!(
                "{s:?}: the index must be below the count (0/{count}..)"
            ));
        }
        if count > MAX_COUNT {
            return Err(format!("{s:?}: at most {MAX_COUNT} parts"));
        }
        Ok(Self { index, count })
    }
}

impl Part {
    /// Whether `index < count <= MAX_COUNT`, for parts built in code rather than parsed.
    pub fn is_valid(&self) -> bool {
        self.index < self.count && self.count <= MAX_COUNT
    }
}

impl TryFrom<String> for Part {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Part> for String {
    fn from(p: Part) -> String {
        p.to_string()
    }
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_parse_print_and_reject_nonsense() {
        let p: Part = " 2 / 5".parse().expect("valid");
        assert_eq!((p.index, p.count, p.to_string()), (2, 5, "2/5".to_string()));
        for bad in [
            "5/5",
            "1/0",
            "x/3",
            "3",
            "-1/3",
            "1/y",
            "0/65537",
            "0/4000000000",
        ] {
            let e = bad.parse::<Part>().expect_err(bad);
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        assert!(
            "65535/65536"
                .parse::<Part>()
                .expect("the largest")
                .is_valid()
        );
        assert!(!Part { index: 3, count: 3 }.is_valid());
    }

    #[test]
    fn parts_are_strings_in_config_files() {
        #[derive(Debug, Deserialize, Serialize)]
        struct Config {
            shard: Part,
        }
        let c: Config = serde_json::from_str(r#"{"shard":"3/10"}"#).expect("valid");
        assert_eq!(
            c.shard,
            Part {
                index: 3,
                count: 10
            }
        );
        assert_eq!(
            serde_json::to_string(&c).expect("serialises"),
            r#"{"shard":"3/10"}"#
        );
        let e = serde_json::from_str::<Config>(r#"{"shard":"10/3"}"#).expect_err("invalid");
        assert!(e.to_string().contains("10/3"), "{e}");
    }
}
