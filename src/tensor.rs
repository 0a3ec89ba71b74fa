//! `Tensor`: a shape, an element type, and storage that lives on one device.
//!
//! Host storage is either owned or a read-only window into a memory-mapped checkpoint, so frozen
//! weights are never copied on the CPU. Compute on the CPU is f32; half-precision tensors exist so
//! checkpoints stored in f16/bf16 can be held and converted once.

use std::sync::Arc;

use anyhow::{bail, Result};
use half::{bf16, f16};
use memmap2::Mmap;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size_of(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// Bytes that back a host tensor: an owned vector (typed, so it is aligned for its elements) or
/// a slice of a mapped file.
#[derive(Clone)]
pub enum HostBytes {
    F32(Arc<Vec<f32>>),
    /// f16 or bf16 bit patterns.
    Half(Arc<Vec<u16>>),
    /// `len` bytes from `offset` in a mapped file. Kept only when suitably aligned for the dtype.
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
}

impl HostBytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            HostBytes::F32(v) => bytemuck::cast_slice(v),
            HostBytes::Half(v) => bytemuck::cast_slice(v),
            HostBytes::Mapped { map, offset, len } => &map[*offset..*offset + *len],
        }
    }
}

/// Where a tensor's elements live.
#[derive(Clone)]
pub enum Storage {
    Host(HostBytes),
    /// Device memory of the CUDA backend.
    Cuda(crate::backend::cuda::CudaBuf),
}

#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    storage: Storage,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?})", self.dtype, self.shape)
    }
}

impl Tensor {
    /// An owned f32 host tensor. Panics only on a programming error (length != shape product).
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Tensor {
        assert_eq!(data.len(), shape.iter().product::<usize>(), "shape {shape:?} does not fit data");
        Tensor { shape: shape.to_vec(), dtype: DType::F32, storage: Storage::Host(HostBytes::F32(Arc::new(data))) }
    }

    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor::from_vec(vec![0.0; shape.iter().product()], shape)
    }

    /// A host tensor over raw little-endian bytes, checked against shape and dtype.
    pub fn from_host_bytes(bytes: HostBytes, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let want = shape.iter().product::<usize>() * dtype.size_of();
        let have = bytes.as_slice().len();
        if want != have {
            bail!("{have} bytes cannot hold a {dtype:?} tensor of shape {shape:?} ({want} bytes)");
        }
        // Mapped bytes are used in place only when aligned for the element type.
        let bytes = match bytes {
            HostBytes::Mapped { .. } if !(bytes.as_slice().as_ptr() as usize).is_multiple_of(dtype.size_of()) => match dtype {
                DType::F32 => HostBytes::F32(Arc::new(bytemuck::pod_collect_to_vec(bytes.as_slice()))),
                DType::F16 | DType::BF16 => HostBytes::Half(Arc::new(bytemuck::pod_collect_to_vec(bytes.as_slice()))),
            },
            b => b,
        };
        Ok(Tensor { shape: shape.to_vec(), dtype, storage: Storage::Host(bytes) })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Same data, another shape of equal size.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.numel() {
            bail!("cannot reshape {:?} to {shape:?}", self.shape);
        }
        Ok(Tensor { shape: shape.to_vec(), ..self.clone() })
    }

    /// A tensor over device memory holding `shape` elements of `dtype`.
    pub fn from_cuda(buf: crate::backend::cuda::CudaBuf, dtype: DType, shape: &[usize]) -> Tensor {
        Tensor { shape: shape.to_vec(), dtype, storage: Storage::Cuda(buf) }
    }

    /// The elements as an f32 slice (host f32 tensors only).
    pub fn f32s(&self) -> Result<&[f32]> {
        match (&self.storage, self.dtype) {
            (Storage::Host(b), DType::F32) => Ok(bytemuck::cast_slice(b.as_slice())),
            (_, dt) => bail!("expected a host f32 tensor, found {dt:?}"),
        }
    }

    /// The elements' bits as a u16 slice (host f16 / bf16 tensors only).
    pub fn halves(&self) -> Result<&[u16]> {
        match (&self.storage, self.dtype) {
            (Storage::Host(b), DType::F16 | DType::BF16) => {
                bytemuck::try_cast_slice(b.as_slice()).map_err(|e| anyhow::anyhow!("a half-precision tensor's bytes: {e}"))
            }
            (_, dt) => bail!("expected a host f16 / bf16 tensor, found {dt:?}"),
        }
    }

    /// Converts a host tensor of any dtype to an f32 host tensor (no copy if already f32).
    pub fn to_f32(&self) -> Result<Tensor> {
        let Storage::Host(b) = &self.storage else { bail!("tensor {:?} is in GPU memory; copy it to the host first", self.shape) };
        let data: Vec<f32> = match self.dtype {
            DType::F32 => return Ok(self.clone()),
            DType::F16 => b.as_slice().chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::BF16 => b.as_slice().chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        };
        Ok(Tensor::from_vec(data, &self.shape))
    }

    /// The elements as an owned f32 vector, reusing this tensor's buffer when nothing else
    /// shares it (so elementwise ops can work in place).
    pub fn into_f32_vec(self) -> Result<Vec<f32>> {
        match (self.storage, self.dtype) {
            (Storage::Host(HostBytes::F32(v)), DType::F32) => Ok(Arc::try_unwrap(v).unwrap_or_else(|shared| shared.to_vec())),
            (storage, dtype) => Tensor { shape: self.shape, dtype, storage }.to_vec(),
        }
    }

    /// Copies the elements out as f32 (any dtype).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        Ok(self.to_f32()?.f32s()?.to_vec())
    }

    /// Converts an f32 host tensor to a half-precision one (used for storing weights compactly).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        let x = self.to_f32()?;
        let src = x.f32s()?;
        let bits: Vec<u16> = match dtype {
            DType::F32 => return Ok(x),
            DType::F16 => src.iter().map(|&v| f16::from_f32(v).to_bits()).collect(),
            DType::BF16 => src.iter().map(|&v| bf16::from_f32(v).to_bits()).collect(),
        };
        Ok(Tensor { shape: self.shape.clone(), dtype, storage: Storage::Host(HostBytes::Half(Arc::new(bits))) })
    }

    /// True when the tensor's bytes are a view into a mapped file (no host copy was made).
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Host(HostBytes::Mapped { .. }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_round_trip_is_within_half_precision() {
        let x = Tensor::from_vec(vec![1.0, -2.5, 3.140625, 1e-3], &[2, 2]);
        for (dt, tol) in [(DType::F16, 1e-3), (DType::BF16, 8e-3)] {
            let back = x.to_dtype(dt).unwrap().to_vec().unwrap();
            for (a, b) in x.f32s().unwrap().iter().zip(&back) {
                assert!((a - b).abs() <= tol * a.abs().max(1e-3), "{dt:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn byte_count_must_match_shape() {
        let bytes = HostBytes::Half(Arc::new(vec![0u16; 5]));
        assert!(Tensor::from_host_bytes(bytes, DType::F32, &[3]).is_err());
    }
}
