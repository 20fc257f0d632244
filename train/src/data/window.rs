//! Cutting long-format series (one row per reading) into windows: rows are ordered by group,
//! then time (file order without a time column); a group, or a gap in time larger than the
//! limit, ends a segment; windows of `length` rows start every `stride` rows within a segment
//! and never cross its end.

/// Where the windows of a table are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Windows {
    /// Row indices in group-then-time order.
    pub order: Vec<usize>,
    /// Windows, as positions in `order`.
    pub windows: Vec<WindowAt>,
    /// The longest segment, in rows (for the error when no window fits).
    pub longest_segment: usize,
    /// Segments found.
    pub segments: usize,
}

/// One window: `order[start..start + length]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowAt {
    pub start: usize,
    /// The group it belongs to.
    pub series: u32,
    /// Its first row's position within the group's readings.
    pub position: u32,
}

/// Windows over the rows whose group ids are `groups` (time values `times`, when ordered by
/// time). `max_gap` splits a group where consecutive times differ by more.
pub fn cut(
    groups: &[u32],
    times: Option<&[f64]>,
    length: usize,
    stride: usize,
    max_gap: Option<f64>,
) -> Windows {
    let mut order: Vec<usize> = (0..groups.len()).collect();
    // Stable: equal times keep file order.
    match times {
        Some(t) => order.sort_by(|&a, &b| groups[a].cmp(&groups[b]).then(t[a].total_cmp(&t[b]))),
        None => order.sort_by_key(|&r| groups[r]),
    }
    let mut windows = Vec::new();
    let (mut longest, mut segments) = (0, 0);
    let mut seg_start = 0;
    while seg_start < order.len() {
        let group = groups[order[seg_start]];
        let group_start = seg_start;
        // One group may hold several segments (gaps); positions count within the group.
        let mut end = seg_start;
        while end < order.len() && groups[order[end]] == group {
            end += 1;
        }
        let mut s = group_start;
        while s < end {
            let mut e = s + 1;
            while e < end {
                let gap_too_long = match (times, max_gap) {
                    (Some(t), Some(gap)) => t[order[e]] - t[order[e - 1]] > gap,
                    _ => false,
                };
                if gap_too_long {
                    break;
                }
                e += 1;
            }
            segments += 1;
            longest = longest.max(e - s);
            let mut w = s;
            while w + length <= e {
                windows.push(WindowAt {
                    start: w,
                    series: group,
                    position: (w - group_start) as u32,
                });
                w += stride;
            }
            s = e;
        }
        seg_start = end;
    }
    Windows {
        order,
        windows,
        longest_segment: longest,
        segments,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_never_cross_a_group_or_a_gap() {
        // Group 0: rows 0..5 (times 0..4); group 1: rows 5..9 with a gap between t=2 and t=10.
        let groups = [0, 0, 0, 0, 0, 1, 1, 1, 1];
        let times = [0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 1.0, 10.0, 11.0];
        let w = cut(&groups, Some(&times), 2, 2, Some(1.5));
        let rows: Vec<Vec<usize>> = w
            .windows
            .iter()
            .map(|x| w.order[x.start..x.start + 2].to_vec())
            .collect();
        assert_eq!(rows, vec![vec![0, 1], vec![2, 3], vec![5, 6], vec![7, 8]]);
        for (x, r) in w.windows.iter().zip(&rows) {
            assert!(r.iter().all(|&i| groups[i] == x.series));
        }
        assert_eq!(w.segments, 3);
        assert_eq!(w.longest_segment, 5);
    }

    #[test]
    fn rows_are_ordered_by_time_within_a_group_and_strides_overlap() {
        let groups = [3, 3, 3, 3];
        let times = [3.0, 1.0, 2.0, 0.0];
        let w = cut(&groups, Some(&times), 3, 1, None);
        assert_eq!(w.order, vec![3, 1, 2, 0]);
        assert_eq!(w.windows.len(), 2);
        assert_eq!(w.windows[1].position, 1);
        // Too short for one window: none, and the longest run says why.
        let w = cut(&groups, None, 5, 1, None);
        assert!(w.windows.is_empty());
        assert_eq!(w.longest_segment, 4);
    }
}
