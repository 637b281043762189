"""What the installed torch release supports, decided once at import."""

import torch

# torch.mm / torch.addmm(..., out_dtype=torch.float32) on bf16 or fp16 operands: cuBLAS keeps the product in fp32
# (2.11 and 2.13 have both)
MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()
ADDMM_OUT_DTYPE = "dtype" in torch.ops.aten.addmm.overloads()
