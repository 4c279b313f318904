"""Files and formats, one module per data set: where a copy lives, how it is downloaded and
checked, how its images are decoded, and its class splits. Nothing here samples episodes
or knows Lightning."""
