from ann2snn.app.entry import main

main()
