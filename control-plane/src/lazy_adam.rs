//! AdamW that writes parameters in place and, for embedding tables, touches only the rows a
//! batch used (TensorFlow's LazyAdam, PyTorch's SparseAdam).
//!
//! candle-nn's `AdamW` rebuilds every parameter and both moments as new tensors at each
//! step, about ten passes over all weights. With 200,000 viewers and 50,000 videos the
//! tables hold ~16M weights while a batch reads a few thousand rows, so that step was nearly
//! all of training's time (a 10M-interaction epoch did not finish in 30 minutes). Rows a
//! batch did not touch keep their moments and weights as they were: their decay waits until
//! they are next used, which is what lazy Adam means.
//!
//! candle's gradient of a table lookup is itself a dense table (zeroed, then rows added),
//! so the towers read tables through [`SparseRows`] in training: each lookup copies the
//! rows it uses into a small variable, and the step adds those small gradients back row by
//! row.

use std::cell::RefCell;

use candle_core::{
    CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Tensor, TensorId, Var, backprop::GradStore,
};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

/// One batch's table lookups, each through its own small copy of the rows it reads.
#[derive(Default)]
pub struct SparseRows {
    lookups: RefCell<Vec<Lookup>>,
}

struct Lookup {
    table: TensorId,
    /// Table rows, ascending; row `i` of `copy` holds table row `rows[i]`.
    rows: Vec<u32>,
    copy: Var,
}

impl SparseRows {
    /// `table` rows `ids` (any shape) -> `[..ids.shape, width]`, as `Embedding::forward`
    /// gives, but differentiable only through a copy of the rows used.
    pub fn lookup(&self, table: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
        let width = table.dim(1)?;
        let mut dims = ids.dims().to_vec();
        dims.push(width);
        let ids: Vec<u32> = match ids.dtype() {
            DType::U32 => ids.flatten_all()?.to_vec1()?,
            _ => ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?,
        };
        let mut rows = ids.clone();
        rows.sort_unstable();
        rows.dedup();
        let local: Vec<u32> = ids
            .iter()
            .map(|id| rows.partition_point(|row| row < id) as u32)
            .collect();
        let device = table.device();
        let row_count = rows.len();
        let copy = Var::from_tensor(
            &table
                .detach()
                .index_select(&Tensor::from_slice(&rows, row_count, device)?, 0)?,
        )?;
        let local_count = local.len();
        let out = copy
            .as_tensor()
            .index_select(&Tensor::from_vec(local, local_count, device)?, 0)?
            .reshape(dims)?;
        self.lookups.borrow_mut().push(Lookup {
            table: table.id(),
            rows,
            copy,
        });
        Ok(out)
    }

    /// Each row's gradient summed over the lookups of `table`: (rows ascending, `[rows,
    /// width]` values).
    fn gradient(
        &self,
        table: TensorId,
        width: usize,
        grads: &GradStore,
    ) -> candle_core::Result<(Vec<u32>, Vec<f32>)> {
        let lookups = self.lookups.borrow();
        let mut parts = Vec::new();
        for lookup in lookups.iter().filter(|l| l.table == table) {
            if let Some(grad) = grads.get(lookup.copy.as_tensor()) {
                parts.push((&lookup.rows, grad.flatten_all()?.to_vec1::<f32>()?));
            }
        }
        let mut entries: Vec<(u32, usize, usize)> = parts
            .iter()
            .enumerate()
            .flat_map(|(part, (rows, _))| {
                rows.iter()
                    .enumerate()
                    .map(move |(index, &row)| (row, part, index))
            })
            .collect();
        entries.sort_unstable();
        let (mut rows, mut summed) = (Vec::new(), Vec::new());
        for (row, part, index) in entries {
            let grad = &parts[part].1[index * width..(index + 1) * width];
            if rows.last() == Some(&row) {
                let start = summed.len() - width;
                for (total, g) in summed[start..].iter_mut().zip(grad) {
                    *total += g;
                }
            } else {
                rows.push(row);
                summed.extend_from_slice(grad);
            }
        }
        Ok((rows, summed))
    }
}

/// A table trained row by row, with its Adam moments.
struct Table {
    var: Var,
    width: usize,
    moments: Moments,
}

struct Moments {
    first: Vec<f32>,
    second: Vec<f32>,
}

/// The optimizer: candle-nn's AdamW for the dense weights, lazy row updates in place for
/// the tables.
pub struct LazyAdamW {
    dense: AdamW,
    tables: Vec<Table>,
    params: ParamsAdamW,
    step: i32,
}

impl LazyAdamW {
    /// An optimizer for `dense` weights and `tables` (each `[rows, width]`).
    pub fn new(
        dense: Vec<Var>,
        tables: Vec<Var>,
        params: ParamsAdamW,
    ) -> candle_core::Result<Self> {
        let tables = tables
            .into_iter()
            .map(|var| {
                let &[_, width] = var.dims() else {
                    candle_core::bail!("a table is [rows, width], not {:?}", var.shape());
                };
                let len = var.elem_count();
                Ok(Table {
                    var,
                    width,
                    moments: Moments {
                        first: vec![0.0; len],
                        second: vec![0.0; len],
                    },
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            dense: AdamW::new(dense, params.clone())?,
            tables,
            params,
            step: 0,
        })
    }

    /// Back-propagates `loss` and takes one step.
    pub fn backward_step(&mut self, loss: &Tensor) -> candle_core::Result<()> {
        let grads = loss.backward()?;
        self.step(&grads, &SparseRows::default())
    }

    /// As [`LazyAdamW::backward_step`] for a loss whose tables were read through `sparse`.
    pub fn backward_step_sparse(
        &mut self,
        loss: &Tensor,
        sparse: &SparseRows,
    ) -> candle_core::Result<()> {
        let grads = loss.backward()?;
        self.step(&grads, sparse)
    }

    /// One step from gradients already computed: a table from its own gradient if it has
    /// one (the rows whose gradient is not zero), else from its lookups in `sparse`.
    pub fn step(&mut self, grads: &GradStore, sparse: &SparseRows) -> candle_core::Result<()> {
        self.dense.step(grads)?;
        self.step += 1;
        let p = &self.params;
        let rule = Rule {
            lr: p.lr as f32,
            beta1: p.beta1 as f32,
            beta2: p.beta2 as f32,
            eps: p.eps as f32,
            decay: (1.0 - p.lr * p.weight_decay) as f32,
            first_scale: (1.0 / (1.0 - p.beta1.powi(self.step))) as f32,
            second_scale: (1.0 / (1.0 - p.beta2.powi(self.step))) as f32,
        };
        for table in &mut self.tables {
            let width = table.width;
            let moments = RefCell::new(&mut table.moments);
            if let Some(grad) = grads.get(table.var.as_tensor()) {
                let op = NonZeroRows {
                    rule,
                    width,
                    moments,
                };
                table.var.inplace_op2(grad, &op)?;
            } else {
                let (rows, grads) = sparse.gradient(table.var.id(), width, grads)?;
                if rows.is_empty() {
                    continue;
                }
                let op = GatheredRows {
                    rule,
                    width,
                    rows: &rows,
                    grads: &grads,
                    moments,
                };
                table.var.inplace_op1(&op)?;
            }
        }
        Ok(())
    }
}

/// Adam's update with decoupled weight decay, the step's bias corrections folded in.
#[derive(Debug, Clone, Copy)]
struct Rule {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    decay: f32,
    first_scale: f32,
    second_scale: f32,
}

impl Rule {
    fn apply(&self, weights: &mut [f32], grads: &[f32], first: &mut [f32], second: &mut [f32]) {
        for (((w, &g), m), v) in weights
            .iter_mut()
            .zip(grads)
            .zip(first.iter_mut())
            .zip(second.iter_mut())
        {
            *m = self.beta1 * *m + (1.0 - self.beta1) * g;
            *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
            let step = (*m * self.first_scale) / ((*v * self.second_scale).sqrt() + self.eps);
            *w = *w * self.decay - self.lr * step;
        }
    }

    /// Updates row `row` of a table (rows as long as `grad`) and its moments.
    fn apply_row(&self, row: usize, grad: &[f32], weights: &mut [f32], moments: &mut Moments) {
        let span = row * grad.len()..(row + 1) * grad.len();
        self.apply(
            &mut weights[span.clone()],
            grad,
            &mut moments.first[span.clone()],
            &mut moments.second[span],
        );
    }
}

fn weights_of<'s>(
    storage: &'s mut CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'s mut [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("lazy AdamW needs contiguous tensors");
    };
    let CpuStorage::F32(weights) = storage else {
        candle_core::bail!("lazy AdamW trains f32 weights only");
    };
    Ok(&mut weights[start..end])
}

/// Row updates from a table's dense gradient, skipping rows it leaves at zero. A candle
/// in-place op: the only way candle lends a tensor's storage mutably.
struct NonZeroRows<'a> {
    rule: Rule,
    width: usize,
    moments: RefCell<&'a mut Moments>,
}

impl InplaceOp2 for NonZeroRows<'_> {
    fn name(&self) -> &'static str {
        "lazy-adamw"
    }

    fn cpu_fwd(
        &self,
        weights: &mut CpuStorage,
        weights_layout: &Layout,
        grads: &CpuStorage,
        grads_layout: &Layout,
    ) -> candle_core::Result<()> {
        let Some((start, end)) = grads_layout.contiguous_offsets() else {
            candle_core::bail!("lazy AdamW needs contiguous tensors");
        };
        let grads = &grads.as_slice::<f32>()?[start..end];
        let weights = weights_of(weights, weights_layout)?;
        let mut moments = self.moments.borrow_mut();
        if weights.len() != grads.len() {
            candle_core::bail!(
                "lazy AdamW: {} weights, {} gradients",
                weights.len(),
                grads.len()
            );
        }
        let width = self.width;
        for (row, grad) in grads.chunks_exact(width).enumerate() {
            if grad.iter().all(|&g| g == 0.0) {
                continue;
            }
            self.rule.apply_row(row, grad, weights, &mut moments);
        }
        Ok(())
    }
}

/// Row updates from gradients gathered outside the table (see [`SparseRows`]).
struct GatheredRows<'a> {
    rule: Rule,
    width: usize,
    rows: &'a [u32],
    grads: &'a [f32],
    moments: RefCell<&'a mut Moments>,
}

impl InplaceOp1 for GatheredRows<'_> {
    fn name(&self) -> &'static str {
        "lazy-adamw-rows"
    }

    fn cpu_fwd(&self, weights: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let weights = weights_of(weights, layout)?;
        let mut moments = self.moments.borrow_mut();
        let width = self.width;
        for (&row, grad) in self.rows.iter().zip(self.grads.chunks_exact(width)) {
            if (row as usize + 1) * width > weights.len() {
                candle_core::bail!("lazy AdamW: row {row} is outside the table");
            }
            self.rule
                .apply_row(row as usize, grad, weights, &mut moments);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};
    use candle_nn::{Embedding, Optimizer};

    fn table(values: &[f32], rows: usize, width: usize) -> Var {
        Var::from_tensor(&Tensor::from_slice(values, (rows, width), &Device::Cpu).unwrap()).unwrap()
    }

    fn loss(table: &Var, rows: &[u32]) -> Tensor {
        let rows = Tensor::from_slice(rows, rows.len(), &Device::Cpu).unwrap();
        Embedding::new(table.as_tensor().clone(), 3)
            .forward(&rows)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
    }

    fn values(var: &Var) -> Vec<f32> {
        var.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Without weight decay a dense step with a zero gradient and zero moments is a no-op,
    /// so rows used from the first step on see the same updates lazily and densely.
    fn without_decay() -> ParamsAdamW {
        ParamsAdamW {
            lr: 0.05,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        }
    }

    #[test]
    fn row_updates_leave_untouched_rows_alone_and_match_adamw_on_used_ones() {
        let start: Vec<f32> = (0..12).map(|i| (i as f32 - 5.5) / 4.0).collect();
        let lazy_table = table(&start, 4, 3);
        let dense_table = table(&start, 4, 3);
        let mut lazy = LazyAdamW::new(vec![], vec![lazy_table.clone()], without_decay()).unwrap();
        let mut dense = AdamW::new(vec![dense_table.clone()], without_decay()).unwrap();
        // Row 3 is never used; row 1 only at the first step.
        for rows in [[0u32, 1], [0, 2], [2, 0]] {
            lazy.backward_step(&loss(&lazy_table, &rows)).unwrap();
            dense.backward_step(&loss(&dense_table, &rows)).unwrap();
        }
        let (lazy, dense) = (values(&lazy_table), values(&dense_table));
        assert_eq!(&lazy[9..12], &start[9..12], "row 3 was never used");
        for row in [0, 2] {
            for (a, b) in lazy[row * 3..row * 3 + 3]
                .iter()
                .zip(&dense[row * 3..row * 3 + 3])
            {
                assert!((a - b).abs() < 1e-5, "row {row}: {a} vs {b}");
            }
        }
        assert_ne!(
            lazy[3..6],
            start[3..6],
            "row 1 was trained at the first step"
        );
        assert_ne!(
            &lazy[3..6],
            &dense[3..6],
            "row 1 kept its momentum only densely"
        );
    }

    #[test]
    fn lookups_through_copies_train_as_lookups_of_the_table() {
        let start: Vec<f32> = (0..15).map(|i| (i as f32 - 7.0) / 5.0).collect();
        let direct = table(&start, 5, 3);
        let copied = table(&start, 5, 3);
        let params = ParamsAdamW::default();
        let mut direct_adam = LazyAdamW::new(vec![], vec![direct.clone()], params.clone()).unwrap();
        let mut copied_adam = LazyAdamW::new(vec![], vec![copied.clone()], params).unwrap();
        // Two lookups of the same table in one loss (as the video table is read for the
        // history and for the candidates), with repeated rows and a 2-d id tensor.
        for (first, second) in [([4u32, 0, 4, 1], [1u32, 1]), ([2, 2, 0, 3], [4, 0])] {
            direct_adam
                .backward_step(&(loss(&direct, &first) + loss(&direct, &second)).unwrap())
                .unwrap();
            let sparse = SparseRows::default();
            let squares = |ids: Tensor| {
                sparse
                    .lookup(copied.as_tensor(), &ids)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let a = squares(Tensor::from_slice(&first, (2, 2), &Device::Cpu).unwrap());
            let b = squares(Tensor::from_slice(&second, 2, &Device::Cpu).unwrap());
            copied_adam
                .backward_step_sparse(&(a + b).unwrap(), &sparse)
                .unwrap();
        }
        for (a, b) in values(&direct).iter().zip(values(&copied)) {
            assert!((a - b).abs() < 1e-7, "{a} vs {b}");
        }
        assert_ne!(values(&copied), start, "the lookups trained the table");
    }

    #[test]
    fn a_table_has_two_dimensions() {
        let var = Var::from_tensor(&Tensor::zeros(12, DType::F32, &Device::Cpu).unwrap()).unwrap();
        assert!(LazyAdamW::new(vec![], vec![var], ParamsAdamW::default()).is_err());
    }
}
