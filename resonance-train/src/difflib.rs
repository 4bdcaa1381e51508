//! Python's `difflib.SequenceMatcher` for token-id sequences, ported exactly (CPython 3.11
//! `Lib/difflib.py`, `isjunk=None`), for DDPO's chosen/rejected diff.
//!
//! "Exactly" matters here: DDPO trains only on the tokens that the diff marks as modified, so a
//! different choice between equally long matches (or a missing "popular element" rule) would
//! train on different tokens than VL-RLHF. The port therefore keeps Python's iteration order and
//! tie rules:
//!
//! * `b2j` maps each element of `b` to its indices, ascending. With `autojunk` (Python's default)
//!   and `len(b) ≥ 200`, every element occurring more than `len(b) / 100 + 1` times (integer
//!   division) is "popular" and removed from `b2j`: it can never start a match, only extend one.
//! * [`SequenceMatcher::find_longest_match`] scans `i` ascending and, per `i`, the `j`s of `b2j`
//!   ascending, replacing the best only on a strictly longer run: of equally long matches it returns
//!   the one starting earliest in `a`, then earliest in `b`. The run is then extended on both ends
//!   by equal elements (this is how popular elements join a match). Python's second pair of
//!   extension loops only absorbs junk elements; with `isjunk=None` there are none, so they are
//!   omitted.
//! * [`SequenceMatcher::get_matching_blocks`] recurses left and right of each longest match,
//!   sorts, merges adjacent blocks and appends the `(len(a), len(b), 0)` sentinel.
//!
//! `fixtures/ddpo/generate.py` records Python's blocks and opcodes for many random pairs (short,
//! long enough for autojunk, repeats, ties, empty); `tests::matches_python_difflib` below asserts
//! identical output.

use std::collections::HashMap;

/// A matching block: `a[a..a + size] == b[b..b + size]` (Python's `Match(a, b, size)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Match {
    pub a: usize,
    pub b: usize,
    pub size: usize,
}

/// The kind of an [`Opcode`], Python's tag strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    Replace,
    Delete,
    Insert,
    Equal,
}

impl Tag {
    /// Python's tag string.
    pub fn as_str(self) -> &'static str {
        match self {
            Tag::Replace => "replace",
            Tag::Delete => "delete",
            Tag::Insert => "insert",
            Tag::Equal => "equal",
        }
    }
}

/// `(tag, i1, i2, j1, j2)`: how to turn `a[i1..i2]` into `b[j1..j2]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opcode {
    pub tag: Tag,
    pub i1: usize,
    pub i2: usize,
    pub j1: usize,
    pub j2: usize,
}

/// `difflib.SequenceMatcher(None, a, b, autojunk)` on `u32` sequences.
#[derive(Debug, Clone)]
pub struct SequenceMatcher<'s> {
    a: &'s [u32],
    b: &'s [u32],
    /// Indices in `b` of each non-popular element, ascending.
    b2j: HashMap<u32, Vec<usize>>,
}

impl<'s> SequenceMatcher<'s> {
    /// Python's default: `SequenceMatcher(None, a, b)` (autojunk on).
    pub fn new(a: &'s [u32], b: &'s [u32]) -> Self {
        Self::with_autojunk(a, b, true)
    }

    /// `SequenceMatcher(None, a, b, autojunk=autojunk)`.
    pub fn with_autojunk(a: &'s [u32], b: &'s [u32], autojunk: bool) -> Self {
        let mut b2j: HashMap<u32, Vec<usize>> = HashMap::new();
        for (i, &elt) in b.iter().enumerate() {
            b2j.entry(elt).or_default().push(i);
        }
        let n = b.len();
        if autojunk && n >= 200 {
            let ntest = n / 100 + 1;
            b2j.retain(|_, idxs| idxs.len() <= ntest);
        }
        Self { a, b, b2j }
    }

    /// The longest matching block in `a[alo..ahi]` and `b[blo..bhi]` (size 0 if none), with
    /// Python's tie rules (see the module doc).
    pub fn find_longest_match(&self, alo: usize, ahi: usize, blo: usize, bhi: usize) -> Match {
        let (a, b) = (self.a, self.b);
        let (mut besti, mut bestj, mut bestsize) = (alo, blo, 0usize);
        // j2len[j] = length of the longest match ending at a[i - 1] and b[j].
        let mut j2len: HashMap<usize, usize> = HashMap::new();
        let mut newj2len: HashMap<usize, usize> = HashMap::new();
        for (i, elt) in a.iter().enumerate().take(ahi).skip(alo) {
            newj2len.clear();
            if let Some(js) = self.b2j.get(elt) {
                for &j in js {
                    if j < blo {
                        continue;
                    }
                    if j >= bhi {
                        break;
                    }
                    let k = j
                        .checked_sub(1)
                        .and_then(|p| j2len.get(&p))
                        .copied()
                        .unwrap_or(0)
                        + 1;
                    newj2len.insert(j, k);
                    if k > bestsize {
                        (besti, bestj, bestsize) = (i + 1 - k, j + 1 - k, k);
                    }
                }
            }
            std::mem::swap(&mut j2len, &mut newj2len);
        }
        while besti > alo && bestj > blo && a[besti - 1] == b[bestj - 1] {
            (besti, bestj, bestsize) = (besti - 1, bestj - 1, bestsize + 1);
        }
        while besti + bestsize < ahi
            && bestj + bestsize < bhi
            && a[besti + bestsize] == b[bestj + bestsize]
        {
            bestsize += 1;
        }
        Match {
            a: besti,
            b: bestj,
            size: bestsize,
        }
    }

    /// Python's `get_matching_blocks()`: non-adjacent blocks in increasing order, then the
    /// `(len(a), len(b), 0)` sentinel.
    pub fn get_matching_blocks(&self) -> Vec<Match> {
        let (la, lb) = (self.a.len(), self.b.len());
        let mut queue = vec![(0, la, 0, lb)];
        let mut blocks = Vec::new();
        while let Some((alo, ahi, blo, bhi)) = queue.pop() {
            let x = self.find_longest_match(alo, ahi, blo, bhi);
            let (i, j, k) = (x.a, x.b, x.size);
            if k > 0 {
                blocks.push(x);
                if alo < i && blo < j {
                    queue.push((alo, i, blo, j));
                }
                if i + k < ahi && j + k < bhi {
                    queue.push((i + k, ahi, j + k, bhi));
                }
            }
        }
        blocks.sort();
        let mut out = Vec::with_capacity(blocks.len() + 1);
        let (mut i1, mut j1, mut k1) = (0, 0, 0);
        for Match {
            a: i2,
            b: j2,
            size: k2,
        } in blocks
        {
            if i1 + k1 == i2 && j1 + k1 == j2 {
                k1 += k2;
            } else {
                if k1 > 0 {
                    out.push(Match {
                        a: i1,
                        b: j1,
                        size: k1,
                    });
                }
                (i1, j1, k1) = (i2, j2, k2);
            }
        }
        if k1 > 0 {
            out.push(Match {
                a: i1,
                b: j1,
                size: k1,
            });
        }
        out.push(Match {
            a: la,
            b: lb,
            size: 0,
        });
        out
    }

    /// Python's `get_opcodes()`.
    pub fn get_opcodes(&self) -> Vec<Opcode> {
        let (mut i, mut j) = (0, 0);
        let mut out = Vec::new();
        for Match { a: ai, b: bj, size } in self.get_matching_blocks() {
            let tag = match (i < ai, j < bj) {
                (true, true) => Some(Tag::Replace),
                (true, false) => Some(Tag::Delete),
                (false, true) => Some(Tag::Insert),
                (false, false) => None,
            };
            if let Some(tag) = tag {
                out.push(Opcode {
                    tag,
                    i1: i,
                    i2: ai,
                    j1: j,
                    j2: bj,
                });
            }
            (i, j) = (ai + size, bj + size);
            if size > 0 {
                out.push(Opcode {
                    tag: Tag::Equal,
                    i1: ai,
                    i2: i,
                    j1: bj,
                    j2: j,
                });
            }
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::Value;

    pub(crate) fn fixture() -> Value {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/ddpo/expected.json");
        let text = std::fs::read_to_string(&path).expect("fixtures/ddpo/expected.json exists");
        serde_json::from_str(&text).expect("valid json")
    }

    fn ids(v: &Value) -> Vec<u32> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_u64().expect("token id") as u32)
            .collect()
    }

    #[test]
    fn matches_python_difflib() {
        let e = fixture();
        let cases = e["difflib"].as_array().expect("cases");
        let mut long = 0;
        for case in cases {
            let (a, b) = (ids(&case["a"]), ids(&case["b"]));
            long += usize::from(b.len() >= 200);
            let sm = SequenceMatcher::new(&a, &b);
            let blocks: Vec<Value> = sm
                .get_matching_blocks()
                .iter()
                .map(|m| serde_json::json!([m.a, m.b, m.size]))
                .collect();
            assert_eq!(
                Value::from(blocks),
                case["blocks"],
                "blocks of {a:?} / {b:?}"
            );
            let opcodes: Vec<Value> = sm
                .get_opcodes()
                .iter()
                .map(|o| serde_json::json!([o.tag.as_str(), o.i1, o.i2, o.j1, o.j2]))
                .collect();
            assert_eq!(
                Value::from(opcodes),
                case["opcodes"],
                "opcodes of {a:?} / {b:?}"
            );
        }
        assert!(
            cases.len() > 90 && long >= 10,
            "{} cases, {long} long",
            cases.len()
        );
    }

    #[test]
    fn popular_elements_only_extend_matches() {
        // 250 items: ntest = 250 / 100 + 1 = 3, and 0 occurs 6 times in b, so it is popular: it
        // cannot start a match, only extend the match of 9 backwards. Without autojunk the
        // first run of two zeros wins. (Values from Python's difflib.)
        let mut b: Vec<u32> = (100..345).collect();
        b.extend([0, 0, 0, 0, 0]);
        b[10] = 0;
        b[11] = 9;
        let a = vec![0, 0, 9];
        let sm = SequenceMatcher::new(&a, &b);
        assert_eq!(
            sm.find_longest_match(0, 3, 0, b.len()),
            Match {
                a: 1,
                b: 10,
                size: 2
            }
        );
        let plain = SequenceMatcher::with_autojunk(&a, &b, false);
        assert_eq!(
            plain.find_longest_match(0, 3, 0, b.len()),
            Match {
                a: 0,
                b: 245,
                size: 2
            }
        );
    }
}
