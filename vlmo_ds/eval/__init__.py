"""Evaluation of VLMo: retrieval recall (plain and ITM re-ranked), the official VQA score and NLVR2 accuracy, every
one computed with the data-parallel ranks sharing the work (sharded), embedding export, and the command
`python -m vlmo_ds.eval` (cli)."""
