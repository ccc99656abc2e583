"""What other tools read, made from an esm_all.pt.

    export.py  one vector per gene: SATURN/UCE {SYMBOL: tensor}, npz, parquet
    h5ad.py    varm / var / uns write-back into a copy of an .h5ad
"""
