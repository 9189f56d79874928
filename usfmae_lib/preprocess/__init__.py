"""Step 02: annotation removal and standardisation (paper section 2.2). Where to look:

    detectors.py  the method for one image: every stage (OCR text, CLAHE, colour and grey marks,
                  mask morphology, inpainting, resize), `CleanConfig` with each knob, the cleaner
                  presets `STUDY` and `OFFICIAL` (`CLEANERS`, `make_config(cleaner=...)`), `clean_image`
    batch.py      a folder tree or curation manifest on all cores, resumable (`clean_tree`), its
                  report and index, and the `usfmae clean` command
    evaluate.py   scores against ground truth: synthetic per-kind masks and ablations
                  (`evaluate_annotated`), OCR before and after on real scans (`evaluate_real`)
    figures.py    notebook 02's figures (`plot_stages`, `plot_removal_quality`, Fig. 2 as
                  `plot_annotation_removal`, `plot_clean_samples`) and short tables (`config_changes`)

Notebook 02 and `usfmae clean` use the names below (`from usfmae_lib import preprocess as pp`).
"""
from .batch import (INDEX_COLUMNS, MANIFEST_COLUMNS, REPORT_COLUMNS, add_cli, clean_job, clean_tree, cpu_count,
                    list_jobs, read_image, write_png)
from .detectors import (CLEANERS, DETECTORS, IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, OFFICIAL,
                        STAGES, STUDY, CleanConfig, Cleaner, check_tesseract, clahe_lab, clean_image, cleaner_name,
                        cleaner_preset, colour_mask, combine_masks, detect, grey_input, grey_mask, inpaint,
                        make_config, normalize, resize_image, text_mask)
from .evaluate import (ABLATIONS, KINDS, PSNR_IDENTICAL, evaluate_annotated, evaluate_real, image_scores,
                       markdown_table, mask_scores, psnr_ssim, read_words, still_read, summarize_annotated,
                       synthetic_kind_masks)
from .figures import (config_changes, mask_fraction_row, most_marked, plot_annotation_removal, plot_clean_samples,
                      plot_removal_quality, plot_stages, quality_per_kind, real_summary, unannotated_stills)

__all__ = [name for name in dir() if not name.startswith("_")]
