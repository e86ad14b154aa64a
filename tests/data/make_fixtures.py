"""Write the tiny test fixtures in this folder (deterministic; run again to refresh them).

    python tests/data/make_fixtures.py [FOLDER]     # default: the folder of this script

- ct_32.png, mri_32.png: an aligned 32x32 8-bit grey pair (a synthetic head: skull ring, brain)
- pet_32.png: a 32x32 8-bit RGB pseudo-colour "PET" of the same head
- mri_2slice.nii.gz: 32x32x2 float32 MRI-like volume (signal x 1000), RAS affine, 1 x 1 x 3 mm;
  its slice 0 read with bsafuse's axis convention is mri_32.png
- ct_32.dcm: 32x32 int16 CT slice in HU via RescaleIntercept -1024, written with pydicom alone

Everything is drawn from formulas (no randomness) and written without bsafuse, so the readers are
tested against files bsafuse did not make. Sizes stay in the kilobytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

SIZE = 32  # pixels per side
NIFTI_AFFINE = np.array([[1.0, 0, 0, -16.0], [0, 1.0, 0, -18.0], [0, 0, 3.0, 20.0], [0, 0, 0, 1]])


def head(shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(radius map, tissue mask): distance from the head centre and a two-lobed 'brain' pattern."""
    y, x = np.mgrid[:SIZE, :SIZE].astype(np.float64)
    radius = np.hypot(x - 15.5 - shift, y - 15.5)
    lobes = 0.5 + 0.5 * np.cos((x - shift) / 3.0) * np.cos(y / 4.0)
    return radius, lobes


def ct_hu() -> np.ndarray:
    """HU: air -1000, skull ring 1200, brain 25..45, CSF-like centre 5."""
    radius, lobes = head()
    hu = np.full((SIZE, SIZE), -1000.0)
    hu[radius < 13] = 1200.0
    hu[radius < 11] = 25.0 + 20.0 * lobes[radius < 11]
    hu[radius < 3] = 5.0
    return np.rint(hu)  # whole HU, as stored


def mri(shift: float = 0.0) -> np.ndarray:
    """MR-like signal in [0, 1]: dark skull, bright scalp fat, grey/white brain pattern."""
    radius, lobes = head(shift)
    signal = np.zeros((SIZE, SIZE))
    signal[radius < 14] = 0.9
    signal[radius < 13] = 0.1
    signal[radius < 11] = 0.4 + 0.4 * lobes[radius < 11]
    return signal


def write_pngs(folder: Path) -> None:
    ct = np.clip((ct_hu() + 100.0) / 400.0, 0, 1)  # the default brain-bone window
    Image.fromarray(np.rint(ct * 255).astype(np.uint8)).save(folder / "ct_32.png")
    Image.fromarray(np.rint(mri() * 255).astype(np.uint8)).save(folder / "mri_32.png")
    radius, lobes = head()
    uptake = np.where(radius < 11, lobes, 0.0)
    rgb = np.stack([uptake, uptake**2, 0.3 * (radius < 11) * (1 - uptake)], axis=-1)  # hot-ish map
    Image.fromarray(np.rint(rgb * 255).astype(np.uint8)).save(folder / "pet_32.png")


def write_nifti(folder: Path) -> None:
    # RAS storage runs i toward the patient's right and j toward anterior, so the upright image
    # (anterior up, patient's left on the right) is stored transposed and reversed in both axes
    slices = [image.T[::-1, ::-1] for image in (mri(), mri(shift=1.0))]
    data = (np.stack(slices, axis=-1) * 1000).astype(np.float32)
    nib.save(nib.Nifti1Image(data, NIFTI_AFFINE), folder / "mri_2slice.nii.gz")


def write_dicom(folder: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["bsafuse fixture ct_32 sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["bsafuse fixture ct_32 study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["bsafuse fixture ct_32 series"])
    ds.PatientName, ds.PatientID, ds.Modality = "", "", "CT"
    ds.Rows = ds.Columns = SIZE
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [-15.5, -15.5, 40.0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 3.0
    ds.PixelData = (ct_hu() + 1024).astype("<i2").tobytes()
    pydicom.dcmwrite(folder / "ct_32.dcm", ds, enforce_file_format=True)


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_pngs(folder)
    write_nifti(folder)
    write_dicom(folder)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
