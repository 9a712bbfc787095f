"""Drop-in replacements for other libraries' margin heads, importable as ``marginops.insightface``
and ``marginops.pml`` too:

  insightface  insightface arcface_torch's PartialFC_V2, CombinedMarginLoss, ArcFace, CosFace
  pml          pytorch-metric-learning's classification losses as MarginHeads (from_pml, to_pml)
"""
