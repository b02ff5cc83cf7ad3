"""Datasets: in-memory modality tensors, seeded splits; importing this package registers them."""

from fuselab.data import avmnist, folders, landsat, mfeat, paired, tensors  # noqa: F401  (registration side effects)
from fuselab.data.core import DataBundle, ModalTensors, stratified_split

__all__ = ["DataBundle", "ModalTensors", "stratified_split"]
