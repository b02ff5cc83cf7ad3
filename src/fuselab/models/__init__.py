"""Models: the generic MultiStream network and its builders; importing this package registers them."""

from fuselab.models import cen, conv, custom, cva, mbt, mlp  # noqa: F401  (registration side effects)
from fuselab.models.multistream import MultiStream
from fuselab.models.output import ModelOutput

__all__ = ["ModelOutput", "MultiStream"]
