"""The BSAFusion network: MDF-FR encoder (encoder.py), BSFA alignment (align.py), MMFF fusion
(fuse.py), composed in bsafusion.py. A = moving (CT/PET/SPECT), B = fixed (MRI).

reference.py holds the literal transcription of every equation (``reference_forward``), for the
equivalence tests and the benchmarks' ``--reference`` runs; the network itself never uses it."""

from bsafuse.model.bsafusion import BSAFusion, FusionOutput, identity_registration

__all__ = ["BSAFusion", "FusionOutput", "identity_registration"]
