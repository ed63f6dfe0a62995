"""Public data sets in their official formats as the WebDataset shards vlmo_ds's loaders and tasks read.

One module per format, each turning annotation files into ``convert.Record``s that ``convert.write_split`` writes:
    karpathy      COCO / Flickr30K Karpathy splits      -> retrieval samples  KEY.jpg KEY.txt KEY.json{captions,...}
    vqa2          VQA v2 questions + annotations + COCO -> VQA samples        KEY.jpg KEY.json{question, answers,
                                                                              labels, scores, ...} + answer_vocab.json
    nlvr2         NLVR2 JSON lines + image pairs        -> NLVR2 samples      KEY.left.* KEY.right.* KEY.json{...}
    caption_tsv   CC3M / SBU style caption TSV          -> image-text pairs   KEY.jpg KEY.txt KEY.json{caption,...}
    img2dataset   img2dataset output, read as is        -> its sizes.json only
The layouts are those of the synthetic data set's splits (vlmo_ds.data.synthetic), extended where the public sets
carry more (question ids, answer counts, identifiers). Every split folder holds shard-NNNNNN.tar and sizes.json;
each tool run leaves conversion_report.json (report.py) naming every record it could not write.
``vqa_answers`` holds the official VQA answer normalisation, the answer table and the soft scores; ``out_folder``
refuses an output folder that holds data and, with --overwrite, removes only what an earlier run there wrote.
tools/make_shards.py is the command line.
"""
