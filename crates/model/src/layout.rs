//! Named tensors packed back to back in one buffer: the parameter layout (PyTorch `state_dict`
//! names) and the activation plan are both a `Layout`, so a run's memory is known before it
//! starts and one allocation serves each.

use flint_backend::Tensor;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
}

impl Entry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    entries: Vec<Entry>,
    total: usize,
    /// Each entry starts at a multiple of this many elements (0 or 1: packed back to back).
    align: usize,
}

impl Layout {
    /// An empty layout whose entries each start at a multiple of `align` elements. The
    /// activation plan uses it, so that every activation meets the GPU's alignment wishes
    /// (cuBLASLt's epilogues, for one, want 16-byte aligned vectors and matrices) whatever the
    /// batch shape; the parameters stay packed back to back, as a `state_dict` lists them.
    pub fn aligned(align: usize) -> Layout {
        Layout {
            align,
            ..Layout::default()
        }
    }

    /// Appends a tensor and returns its index.
    pub fn push(&mut self, name: impl Into<String>, shape: &[usize]) -> usize {
        let entry = Entry {
            name: name.into(),
            shape: shape.to_vec(),
            offset: self.total.next_multiple_of(self.align.max(1)),
        };
        self.total = entry.offset + entry.numel();
        self.entries.push(entry);
        self.entries.len() - 1
    }

    /// Elements in all tensors together.
    pub fn total(&self) -> usize {
        self.total
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// The view of entry `index` inside `base`, a buffer laid out by `self`.
    pub fn view(&self, base: Tensor, index: usize) -> Tensor {
        let e = &self.entries[index];
        base.slice(e.offset, e.numel())
    }
}

/// `[2, 3]` as PyTorch prints shapes.
pub fn shape_str(shape: &[usize]) -> String {
    format!(
        "[{}]",
        shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::Layout;

    #[test]
    fn an_aligned_layout_starts_every_entry_on_the_boundary_and_a_default_one_packs() {
        let shapes: [&[usize]; 3] = [&[3, 5], &[7], &[2, 2]];
        let (mut packed, mut aligned) = (Layout::default(), Layout::aligned(16));
        for (i, shape) in shapes.iter().enumerate() {
            packed.push(format!("t{i}"), shape);
            aligned.push(format!("t{i}"), shape);
        }
        let offsets = |l: &Layout| l.entries().iter().map(|e| e.offset).collect::<Vec<_>>();
        assert_eq!(offsets(&packed), [0, 15, 22]);
        assert_eq!(packed.total(), 26);
        assert_eq!(offsets(&aligned), [0, 16, 32]);
        assert_eq!(aligned.total(), 36);
    }
}
