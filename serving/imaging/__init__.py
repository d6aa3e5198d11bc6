"""The images a request carries: the checks and edit defaults of input images
(`input_images`), and the PNG encoder of the services' answers (`png`)."""
