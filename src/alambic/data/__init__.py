"""Data: read documents (`sources`), split them by document, tokenize, mask and collate (`tokenize`), the whole
preparation of a run's data (`prepare`), and the prepared sets with their folder (`prepared`).

Teacher-made data lives beside it, imported from its module (they pull in the models): `data.generate`
(the teacher's responses to the training prompts) and `data.select` (teacher-entropy selection).
"""

from alambic.data.prepare import prepare_datasets
from alambic.data.prepared import PreparedData, load_prepared, save_prepared
from alambic.data.sources import DataSourceError, load_documents
from alambic.data.tokenize import DistillationCollator, split_documents

__all__ = [
    "DataSourceError",
    "DistillationCollator",
    "PreparedData",
    "load_documents",
    "load_prepared",
    "prepare_datasets",
    "save_prepared",
    "split_documents",
]
