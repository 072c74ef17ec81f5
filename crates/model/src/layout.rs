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
}

impl Layout {
    /// Appends a tensor and returns its index.
    pub fn push(&mut self, name: impl Into<String>, shape: &[usize]) -> usize {
        let entry = Entry {
            name: name.into(),
            shape: shape.to_vec(),
            offset: self.total,
        };
        self.total += entry.numel();
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
